//! Every wire message decoded from hostile bytes in each codec (the first
//! byte picks the codec and the message): an error or a message, never a
//! panic; a message decoded is encoded again and reads back.
#![no_main]

use headroom_shared::codec::{Codec, Message};
use headroom_shared::ledger::{RequestConfirmed, RequestRecord, RequestStarted};
use headroom_shared::records::{ClusterRecord, MonitorHeartbeat, ServerRecord, ShardLease};
use headroom_shared::wire::{
    AssignmentNotice, AuditEvent, ClusterList, DeregisterServer, DrainMember, DrainQueued, Empty,
    FrontendApplied, FrontendDemand, GetCluster, MembershipChange, PerformanceReport, PutCluster, ReconfigRequest,
    RegisterServer, ServerList, ServerStatus,
};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: Message>(codec: Codec, body: &[u8]) {
    let Ok(message) = codec.decode::<T>(body) else {
        return;
    };
    let encoded = codec.encode(&message).expect("a decoded message encodes");
    assert!(
        codec.decode::<T>(&encoded).is_ok(),
        "{} does not read back in {codec:?}",
        T::KIND
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let codec = Codec::ALL[usize::from(pick % 3)];
    match (pick / 3) % 24 {
        0 => round_trip::<PerformanceReport>(codec, body),
        1 => round_trip::<ReconfigRequest>(codec, body),
        2 => round_trip::<MembershipChange>(codec, body),
        3 => round_trip::<AssignmentNotice>(codec, body),
        4 => round_trip::<ServerStatus>(codec, body),
        5 => round_trip::<AuditEvent>(codec, body),
        6 => round_trip::<RegisterServer>(codec, body),
        7 => round_trip::<DeregisterServer>(codec, body),
        8 => round_trip::<PutCluster>(codec, body),
        9 => round_trip::<GetCluster>(codec, body),
        10 => round_trip::<DrainMember>(codec, body),
        11 => round_trip::<DrainQueued>(codec, body),
        12 => round_trip::<ServerList>(codec, body),
        13 => round_trip::<ClusterList>(codec, body),
        14 => round_trip::<Empty>(codec, body),
        15 => round_trip::<ServerRecord>(codec, body),
        16 => round_trip::<ClusterRecord>(codec, body),
        17 => round_trip::<ShardLease>(codec, body),
        18 => round_trip::<MonitorHeartbeat>(codec, body),
        19 => round_trip::<RequestRecord>(codec, body),
        20 => round_trip::<FrontendApplied>(codec, body),
        21 => round_trip::<RequestStarted>(codec, body),
        22 => round_trip::<RequestConfirmed>(codec, body),
        _ => round_trip::<FrontendDemand>(codec, body),
    }
});
