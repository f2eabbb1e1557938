//! The vocabulary every write shares: column families ([`Cf`], [`CfHandles`]) and the
//! mutations on them ([`Op`]).
//!
//! `store` builds ops, `journal` encodes them into records, `writer` applies them to RocksDB:
//! this module is the leaf they all import, so none of them imports another for these types.
//!
//! Never: import another module of this crate; hold state (these are plain values and one
//! stateless lookup).

use rocksdb::DB;

/// Column families, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cf {
    Log,
    Meta,
    Index,
}

impl Cf {
    pub(crate) const ALL: [Cf; 3] = [Cf::Log, Cf::Meta, Cf::Index];

    /// The column family's tag in journal records.
    pub(crate) fn tag(self) -> u8 {
        match self {
            Cf::Log => 1,
            Cf::Meta => 2,
            Cf::Index => 3,
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Cf> {
        Cf::ALL.into_iter().find(|cf| cf.tag() == tag)
    }

    /// The column family's name in RocksDB.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::Meta => "meta",
            Cf::Index => "index",
        }
    }
}

/// Resolves column family handles; the set is fixed at open, so a missing one is a bug.
#[derive(Clone, Copy)]
pub(crate) struct CfHandles;

impl CfHandles {
    pub(crate) fn get(self, db: &DB, cf: Cf) -> &rocksdb::ColumnFamily {
        db.cf_handle(cf.name())
            .expect("every column family is created when the store opens")
    }
}

/// One mutation inside a write request.
pub(crate) enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// One key deleted: a point tombstone (a range delete of one key would leave a range
    /// tombstone, which every later read of the column family has to consult).
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// A put stored as it is, in every column family: in `Cf::Log` a journal pointer moved from
    /// another key (see `GroupStore::adopt`), never a log entry's bytes.
    PutRaw {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
}
