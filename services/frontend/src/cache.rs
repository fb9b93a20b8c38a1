//! The front-end's own cache: a response it may answer with again, without
//! touching a member. Bounded by bytes, evicted by quick_cache's S3-FIFO
//! (scan-resistant: one pass over many cold URLs does not flush the hot
//! ones). Only what HTTP says may be shared is kept, for as long as it says.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use quick_cache::Weighter;

use crate::http1::Lines;

/// A stored response.
#[derive(Debug)]
pub struct Cached {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    stored: Instant,
    ttl: Duration,
}

impl Cached {
    pub fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.stored) < self.ttl
    }

    /// Seconds since it was stored, for the `Age` header.
    pub fn age(&self, now: Instant) -> u64 {
        now.duration_since(self.stored).as_secs()
    }
}

#[derive(Debug, Clone, Copy)]
struct ByBytes;

impl Weighter<String, Arc<Cached>> for ByBytes {
    fn weight(&self, key: &String, value: &Arc<Cached>) -> u64 {
        let headers: usize = value
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        (key.len() + headers + value.body.len() + 64) as u64
    }
}

pub struct Cache {
    inner: quick_cache::sync::Cache<String, Arc<Cached>, ByBytes>,
    max_object: u64,
}

impl Cache {
    /// A cache of `bytes`; `None` when `bytes` is 0 (caching off).
    pub fn new(bytes: u64, max_object: u64) -> Option<Self> {
        (bytes > 0).then(|| Self {
            inner: quick_cache::sync::Cache::with_weighter(
                usize::try_from(bytes / 4096).unwrap_or(1024).max(16),
                bytes,
                ByBytes,
            ),
            max_object: max_object.min(bytes),
        })
    }

    pub fn max_object(&self) -> u64 {
        self.max_object
    }

    /// Bytes held now (keys, headers and bodies).
    pub fn weight(&self) -> u64 {
        self.inner.weight()
    }

    /// A fresh response for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Arc<Cached>> {
        match self.lookup(key) {
            Lookup::Fresh(hit) => Some(hit),
            Lookup::Stale | Lookup::Missing => None,
        }
    }

    /// What the cache has for `key`. A stale entry is kept until it is
    /// fetched again: it marks an object worth coalescing misses for.
    pub fn lookup(&self, key: &str) -> Lookup {
        match self.inner.get(key) {
            Some(hit) if hit.fresh(Instant::now()) => Lookup::Fresh(hit),
            Some(_) => Lookup::Stale,
            None => Lookup::Missing,
        }
    }

    /// Drops what is kept for `key` (its new answer may not be kept).
    pub fn forget(&self, key: &str) {
        self.inner.remove(key);
    }

    pub fn put(
        &self,
        key: String,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        ttl: Duration,
    ) {
        if body.len() as u64 > self.max_object {
            return;
        }
        self.inner.insert(
            key,
            Arc::new(Cached {
                status,
                headers,
                body,
                stored: Instant::now(),
                ttl,
            }),
        );
    }
}

/// What the cache has for a key.
pub enum Lookup {
    Fresh(Arc<Cached>),
    /// It was cached and has expired: likely to be asked for again.
    Stale,
    Missing,
}

/// Concurrent requests for an object whose cached copy expired wait for the
/// first to fill the cache again (single flight), so a popular object
/// expiring under load reaches a member once instead of once per client.
/// Only stale objects are coalesced: tracking every miss would cost every
/// uncacheable GET a lock.
#[derive(Debug, Default)]
pub struct Fills {
    filling: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<()>>>,
}

/// What a miss should do.
pub enum Fill<'a> {
    /// Fetch it; others wait until this is dropped.
    Lead(FillGuard<'a>),
    /// Wait for the leader (the channel closes when it is done), then look
    /// again.
    Follow(tokio::sync::watch::Receiver<()>),
}

pub struct FillGuard<'a> {
    fills: &'a Fills,
    key: String,
    // Dropped after `drop` below has removed the key: waiters wake to a
    // filled cache, and newcomers lead a fresh fill.
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut filling) = self.fills.filling.lock() {
            filling.remove(&self.key);
        }
    }
}

impl Fills {
    pub fn join(&self, key: &str) -> Fill<'_> {
        let Ok(mut filling) = self.filling.lock() else {
            // A poisoned lock: no coalescing, every miss fetches.
            let (done, _) = tokio::sync::watch::channel(());
            return Fill::Lead(FillGuard {
                fills: self,
                key: String::new(),
                _done: done,
            });
        };
        if let Some(waiting) = filling.get(key) {
            return Fill::Follow(waiting.clone());
        }
        let (done, waiting) = tokio::sync::watch::channel(());
        filling.insert(key.to_owned(), waiting);
        Fill::Lead(FillGuard {
            fills: self,
            key: key.to_owned(),
            _done: done,
        })
    }
}

/// The cache key of a request: host and path with query.
pub fn key(host: Option<&str>, path_and_query: &str) -> String {
    // Not `format!`: it showed in the instruction counts of every GET.
    let host = host.unwrap_or("");
    let mut key = String::with_capacity(host.len() + path_and_query.len());
    key.push_str(host);
    key.push_str(path_and_query);
    key
}

/// The directives of `Cache-Control` values, trimmed; compared without
/// regard to case, so nothing is copied (this runs for every GET a member
/// answers). The values come from a header map or a member's lines.
fn directives<'a>(values: impl IntoIterator<Item = &'a str>) -> impl Iterator<Item = &'a str> {
    values.into_iter().flat_map(|v| v.split(',')).map(str::trim)
}

/// A map's `Cache-Control` values.
fn cache_control(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

fn has_directive(headers: &HeaderMap, names: &[&str]) -> bool {
    directives(cache_control(headers)).any(|d| names.iter().any(|n| d.eq_ignore_ascii_case(n)))
}

/// Whether a request may be answered from the cache (and its answer
/// stored): no `no-store`/`no-cache`, no credentials.
pub fn request_allows(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::AUTHORIZATION)
        && !has_directive(headers, &["no-store", "no-cache"])
}

/// How long a response may be served from a shared cache, or `None` when
/// it may not be stored: `s-maxage`, then `max-age`, then `Expires`;
/// never with `no-store`, `no-cache`, `private`, `Set-Cookie` or `Vary`.
/// The clock is read only for `Expires`.
pub fn freshness(
    status: StatusCode,
    headers: &HeaderMap,
    now: impl FnOnce() -> SystemTime,
) -> Option<Duration> {
    let terms = Terms {
        personal: headers.contains_key(header::SET_COOKIE) || headers.contains_key(header::VARY),
        cache_control: Directives::read(directives(cache_control(headers))),
        expires: headers.get(header::EXPIRES).map(HeaderValue::as_bytes),
    };
    terms.freshness(status, now)
}

/// [`freshness`], read off a member's header lines kept as they came.
/// `None` from the outer option when the lines say too much to read so
/// (repeated `Cache-Control` or `Expires`): the caller reads a map.
pub fn freshness_of_lines(
    status: StatusCode,
    lines: &Lines,
    now: impl FnOnce() -> SystemTime,
) -> Option<Option<Duration>> {
    let said = lines.cache_terms()?;
    let value = said.cache_control.and_then(|v| std::str::from_utf8(v).ok());
    let terms = Terms {
        personal: said.personal,
        cache_control: Directives::read(directives(value)),
        expires: said.expires,
    };
    Some(terms.freshness(status, now))
}

/// What a response says of its being stored by a shared cache (RFC 9111
/// §3 and §4.2.1), wherever its headers are kept.
struct Terms<'a> {
    /// `Set-Cookie` or `Vary`: not for everyone alike.
    personal: bool,
    cache_control: Directives,
    expires: Option<&'a [u8]>,
}

impl Terms<'_> {
    fn freshness(&self, status: StatusCode, now: impl FnOnce() -> SystemTime) -> Option<Duration> {
        if !matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 404 | 410) {
            return None;
        }
        if self.personal || self.cache_control.forbids {
            return None;
        }
        let ttl = match self.cache_control.s_maxage.or(self.cache_control.max_age) {
            Some(secs) => Duration::from_secs(secs),
            None => {
                let expires = std::str::from_utf8(self.expires?).ok()?;
                let expires = httpdate::parse_http_date(expires).ok()?;
                expires.duration_since(now()).ok()?
            }
        };
        (!ttl.is_zero()).then_some(ttl)
    }
}

/// The `Cache-Control` directives a shared cache keeps by, read in one
/// pass.
#[derive(Debug, Default)]
struct Directives {
    /// `no-store`, `no-cache` or `private`.
    forbids: bool,
    s_maxage: Option<u64>,
    max_age: Option<u64>,
}

impl Directives {
    fn read<'a>(directives: impl Iterator<Item = &'a str>) -> Self {
        let mut read = Self::default();
        for directive in directives {
            let (key, value) = directive.split_once('=').unwrap_or((directive, ""));
            let key = key.trim();
            let seconds = || value.trim().trim_matches('"').parse::<u64>().ok();
            if ["no-store", "no-cache", "private"]
                .iter()
                .any(|n| key.eq_ignore_ascii_case(n))
            {
                read.forbids = true;
            } else if key.eq_ignore_ascii_case("s-maxage") {
                read.s_maxage = read.s_maxage.or_else(seconds);
            } else if key.eq_ignore_ascii_case("max-age") {
                read.max_age = read.max_age.or_else(seconds);
            }
        }
        read
    }
}

/// The `Age` header value.
pub fn age_header(seconds: u64) -> HeaderValue {
    HeaderValue::from(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn what_http_says_may_be_shared_is_kept_as_long_as_it_says() {
        let now = SystemTime::now();
        let ok = StatusCode::OK;
        assert_eq!(
            freshness(
                ok,
                &headers(&[("cache-control", "public, max-age=60")]),
                || now
            ),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            freshness(
                ok,
                &headers(&[("cache-control", "max-age=60, s-maxage=10")]),
                || now
            ),
            Some(Duration::from_secs(10))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        let ttl = freshness(ok, &headers(&[("expires", &later)]), || now).expect("expires");
        assert!(ttl > Duration::from_secs(118) && ttl <= Duration::from_secs(120));
        for refused in [
            &[("cache-control", "no-store")][..],
            &[("cache-control", "private, max-age=60")],
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            &[("cache-control", "max-age=60"), ("vary", "cookie")],
            &[("cache-control", "max-age=0")],
            &[],
        ] {
            assert_eq!(
                freshness(ok, &headers(refused), || now),
                None,
                "{refused:?}"
            );
        }
        assert_eq!(
            freshness(
                StatusCode::INTERNAL_SERVER_ERROR,
                &headers(&[("cache-control", "max-age=60")]),
                || now
            ),
            None
        );
        assert!(request_allows(&headers(&[])));
        assert!(!request_allows(&headers(&[("cache-control", "no-cache")])));
        assert!(!request_allows(&headers(&[(
            "cache-control",
            "max-age=0, No-Store"
        )])));
        assert_eq!(
            freshness(ok, &headers(&[("cache-control", "Max-Age = 30")]), || now),
            Some(Duration::from_secs(30))
        );
        assert!(!request_allows(&headers(&[("authorization", "Bearer x")])));
    }

    #[tokio::test]
    async fn misses_for_one_key_wait_for_the_first() {
        let fills = Fills::default();
        let Fill::Lead(guard) = fills.join("/a") else {
            panic!("the first leads")
        };
        let Fill::Follow(mut waiting) = fills.join("/a") else {
            panic!("the second follows")
        };
        assert!(
            matches!(fills.join("/b"), Fill::Lead(_)),
            "another key leads"
        );
        drop(guard);
        assert!(
            waiting.changed().await.is_err(),
            "woken when the leader is done"
        );
        assert!(
            matches!(fills.join("/a"), Fill::Lead(_)),
            "a new fill after"
        );
    }

    #[test]
    fn the_cache_is_bounded_by_bytes() {
        let cache = Cache::new(64 * 1024, 8 * 1024).expect("on");
        let body = Bytes::from(vec![b'x'; 4 * 1024]);
        for i in 0..100 {
            cache.put(
                format!("/k{i}"),
                StatusCode::OK,
                HeaderMap::new(),
                body.clone(),
                Duration::from_secs(60),
            );
        }
        let kept = (0..100)
            .filter(|i| cache.get(&format!("/k{i}")).is_some())
            .count();
        assert!(kept > 0 && kept <= 16, "kept {kept}");
        cache.put(
            "/big".into(),
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![0; 9 * 1024]),
            Duration::from_secs(60),
        );
        assert!(cache.get("/big").is_none(), "over the object limit");
        assert!(Cache::new(0, 1).is_none());
    }
}
