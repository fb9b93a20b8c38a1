//! Requests held while the cluster has no member (scale from zero): a
//! bounded queue, released in arrival order as soon as a table with
//! members is installed.
//!
//! A request finds the table empty, takes a place in the queue, and looks
//! at the table once more before it waits: the installer stores the table
//! before it releases the queue, so a request can miss neither.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use crate::routing::Table;

/// Why a request could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `frontend.hold_max` requests are held already.
    Full,
}

/// The queue of held requests, and what it counts.
#[derive(Debug, Default)]
pub struct Hold {
    waiting: Mutex<VecDeque<oneshot::Sender<Arc<Table>>>>,
    max: usize,
    /// Told when a request starts waiting, so the demand is reported at
    /// once, not at the next report.
    pub demand: Notify,
    /// Requests ever held, answered after a wait, refused because the
    /// queue was full, and refused because the wait ran out.
    pub held: AtomicU64,
    pub released: AtomicU64,
    pub refused_full: AtomicU64,
    pub timed_out: AtomicU64,
}

impl Hold {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    /// A place in the queue: the receiver gets the first table with
    /// members.
    ///
    /// # Errors
    /// [`Refused::Full`] when `max` requests wait already.
    pub fn enter(&self) -> Result<oneshot::Receiver<Arc<Table>>, Refused> {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.lock();
            if waiting.len() >= self.max {
                // Those that gave up (timed out, client gone) leave room.
                waiting.retain(|w| !w.is_closed());
            }
            if waiting.len() >= self.max {
                self.refused_full.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Full);
            }
            waiting.push_back(tx);
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        self.demand.notify_one();
        Ok(rx)
    }

    /// Hands `table` to every held request, first come first: called once
    /// it is installed, when it has members.
    pub fn release(&self, table: &Arc<Table>) {
        let waiting = std::mem::take(&mut *self.lock());
        for tx in waiting {
            if tx.send(table.clone()).is_ok() {
                self.released.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Requests waiting now (those that gave up are not counted).
    pub fn len(&self) -> usize {
        self.lock().iter().filter(|w| !w.is_closed()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<Arc<Table>>>> {
        // A queue of senders stays whole whatever panicked holding it.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_shared::records::{ClusterPolicy, ClusterRecord};
    use headroom_shared::ClusterId;

    fn table(generation: u64) -> Arc<Table> {
        let mut record = ClusterRecord::new(
            ClusterId::new("web").expect("id"),
            ClusterPolicy::default(),
            0,
        );
        record.generation = generation;
        Arc::new(Table::build(&record, &Default::default()))
    }

    #[tokio::test]
    async fn held_requests_go_first_come_first_and_the_queue_is_bounded() {
        let hold = Hold::new(2);
        let first = hold.enter().expect("room");
        let second = hold.enter().expect("room");
        assert_eq!(hold.enter().err(), Some(Refused::Full));
        assert_eq!(hold.len(), 2);
        hold.release(&table(7));
        assert_eq!(first.await.expect("released").generation, 7);
        assert_eq!(second.await.expect("released").generation, 7);
        assert!(hold.is_empty());
        // One that gave up leaves its place.
        let gave_up = hold.enter().expect("room");
        let _kept = hold.enter().expect("room");
        drop(gave_up);
        assert!(
            hold.enter().is_ok(),
            "the place of one that gave up is taken"
        );
        assert_eq!(hold.refused_full.load(Ordering::Relaxed), 1);
    }
}
