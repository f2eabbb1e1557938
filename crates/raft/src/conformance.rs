//! openraft's own storage conformance suite, run against our log store and partition state
//! machine on a real RocksDB in a temp dir.

use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use ordo_storage::Store;
use ordo_storage::StoreOptions;
use tokio::sync::watch;

use crate::GroupId;
use crate::log_store::LogStore;
use crate::machine::Machine;
use crate::machine::PartitionLogic;
use crate::types::C;

struct Builder;

impl StoreBuilder<C, LogStore, Machine<PartitionLogic>, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, Machine<PartitionLogic>), StorageError<C>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("open store");
        let group = store.group(GroupId(42));
        let (high_watermark, _) = watch::channel(0);
        let machine = Machine::open(group.clone(), PartitionLogic::new(high_watermark))
            .expect("open machine");
        Ok((dir, LogStore::new(group, 4096, None), machine))
    }
}

/// Our storage satisfies every contract openraft's suite checks (append, truncate, purge,
/// vote, membership, snapshot, apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}

/// Every openraft message we send survives a postcard round trip.
#[test]
fn postcard_round_trips_openraft_types() {
    use openraft::entry::RaftEntry;
    use openraft::impls::BasicNode;
    use openraft::vote::RaftLeaderId;
    let vote = crate::types::Vote::new(3, 2);
    let bytes = crate::codec::encode(&vote).unwrap();
    let back: crate::types::Vote = crate::codec::decode(&bytes).unwrap();
    assert_eq!(vote, back);
    let entry = crate::types::Entry::new_normal(
        openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId::new(3, 1), 7),
        crate::Command::Append {
            count: 2,
            batch: bytes::Bytes::from_static(b"abc"),
        },
    );
    let bytes = crate::codec::encode(&entry).unwrap();
    let back: crate::types::Entry = crate::codec::decode(&bytes).unwrap();
    assert_eq!(format!("{entry:?}"), format!("{back:?}"));
    let node = BasicNode {
        addr: "127.0.0.1:1".into(),
    };
    let bytes = crate::codec::encode(&node).unwrap();
    assert_eq!(crate::codec::decode::<BasicNode>(&bytes).unwrap(), node);
}

/// A node restarting with a committed vote for itself (it led that term) does not resume
/// leading the term: its vote becomes uncommitted (same term), so a new term must be elected
/// and it can never reuse the log ids of entries it sent but lost. Another node's committed
/// vote stays as it is. (Regression: the fault suite saw replicas diverge without this.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_does_not_resume_own_leadership() {
    use openraft::RaftLogReader;
    use openraft::storage::RaftLogStorage;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("open store");
    let mut log = LogStore::new(store.group(GroupId(7)), 4096, None);

    log.save_vote(&crate::types::Vote::new_committed(5, 1))
        .await
        .expect("save vote");
    log.give_up_restored_leadership(1).await.expect("demote");
    let vote = log.read_vote().await.expect("read").expect("a vote");
    assert!(!vote.is_committed(), "own leadership is given up: {vote}");
    assert_eq!(vote.leader_id().term, 5, "the term is kept");

    log.save_vote(&crate::types::Vote::new_committed(6, 2))
        .await
        .expect("save vote");
    log.give_up_restored_leadership(1).await.expect("no-op");
    let vote = log.read_vote().await.expect("read").expect("a vote");
    assert!(vote.is_committed(), "another leader's vote stays: {vote}");
}
