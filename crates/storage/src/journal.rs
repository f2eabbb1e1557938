//! The journal: the node's write-ahead log, and the only copy of every log entry's bytes.
//!
//! Every write the writer thread makes is first appended to the journal as one record, then
//! applied to RocksDB with RocksDB's own WAL disabled. Log entries are not copied into RocksDB:
//! their key maps to a [`Location`] in the journal, so a record's bytes reach the disk once per
//! replica (journal), instead of twice (RocksDB WAL, then a blob or SST file at flush).
//! Durability is an `fdatasync` of the journal file being appended.
//!
//! # Files
//! `journal/NNNNNNNNNNNNNNNNNNNN.log`, numbered from 1. A file is never changed once the next one
//! exists: rotation syncs the old file and the directory before the first write to the new one.
//! A record is `magic (4) ++ body length (4, LE) ++ crc32c of body (4, LE) ++ body`; the body is
//! the ops of one RocksDB write batch (see [`encode_op`]). Log entry values inside a body are
//! framed (`crc32c ++ payload`), and a [`Location`] points at that frame.
//!
//! # Recovery
//! Each RocksDB write batch also stores the journal position just past its record
//! (`APPLIED_KEY` in the `meta` column family). RocksDB only persists memtables by flushing them
//! to SST files, and the writer thread triggers every flush itself after syncing the journal, so
//! the persisted position never points past durable journal bytes. On open, records after that
//! position are applied again in order (every op is idempotent when replayed in order). The
//! first record that is torn (short, bad magic, bad checksum) ends the journal: the file is cut
//! there, as RocksDB's point-in-time WAL recovery does. Records there were never reported
//! durable, because every durability callback waits for a sync that covers its record.
//!
//! Never: report a write durable before the journal file holding it is synced; let RocksDB
//! persist state that refers to journal bytes not yet synced; keep writing after a failed sync.

use std::collections::BTreeMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use crate::error::StorageError;
use crate::keys::frame;
use crate::keys::unframe;
use crate::ops::Cf;
use crate::ops::Op;

/// Marks the start of a record ("ORDJ").
const MAGIC: u32 = 0x4a44_524f;
/// Bytes before a record's body.
pub(crate) const HEADER_LEN: u64 = 12;
/// Key (in the `meta` column family) of the journal position applied to RocksDB. It is not a
/// group key, but it sorts inside the meta range of one group id; that is harmless, because
/// every batch writes it last, after any range delete.
pub(crate) const APPLIED_KEY: &[u8] = b"journal-applied";

const OP_PUT: u8 = 1;
const OP_DELETE_RANGE: u8 = 2;
const OP_PUT_RAW: u8 = 3;
const OP_DELETE: u8 = 4;

/// Where a log entry's framed value lives in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) file: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Location {
    pub(crate) const ENCODED_LEN: usize = 20;

    pub(crate) fn encode(self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.file.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Location> {
        if bytes.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(Location {
            file: u64::from_le_bytes(bytes[..8].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
            len: u32::from_le_bytes(bytes[16..].try_into().ok()?),
        })
    }
}

/// A journal position: byte `offset` of file `file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub(crate) file: u64,
    pub(crate) offset: u64,
}

impl Position {
    pub(crate) fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.file.to_le_bytes());
        out[8..].copy_from_slice(&self.offset.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Position> {
        if bytes.len() != 16 {
            return None;
        }
        Some(Position {
            file: u64::from_le_bytes(bytes[..8].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// The journal's files, shared by the writer thread (appends), the fsync thread (syncs) and
/// readers (positional reads, safe to run concurrently with appends).
pub(crate) struct Journal {
    dir: PathBuf,
    files: RwLock<BTreeMap<u64, Arc<File>>>,
    /// The file being appended.
    current: AtomicU64,
    /// Set by the first failed sync or unrecoverable write; every later write and sync fails.
    failed: Mutex<Option<StorageError>>,
    /// Held across every sync: Linux reports a writeback error to one of several concurrent
    /// fsyncs only, so syncs run one at a time and each first checks that none failed before.
    sync_lock: Mutex<()>,
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> StorageError {
    StorageError::Io(format!("{what} {}: {error}", path.display()))
}

fn file_name(id: u64) -> String {
    format!("{id:020}.log")
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| io_error("cannot sync directory", dir, error))
}

impl Journal {
    /// Opens the journal in `dir` (created if missing). Returns it and its files' ids in order.
    pub(crate) fn open(dir: &Path) -> Result<(Arc<Journal>, Vec<u64>), StorageError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|error| io_error("cannot create", dir, error))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let mut files = BTreeMap::new();
        let entries =
            std::fs::read_dir(dir).map_err(|error| io_error("cannot list", dir, error))?;
        for entry in entries {
            let entry = entry.map_err(|error| io_error("cannot list", dir, error))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|name| name.strip_suffix(".log"))
                .and_then(|id| id.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|error| io_error("cannot open", &path, error))?;
            files.insert(id, Arc::new(file));
        }
        let ids: Vec<u64> = files.keys().copied().collect();
        let journal = Arc::new(Journal {
            dir: dir.to_path_buf(),
            current: AtomicU64::new(ids.last().copied().unwrap_or(0)),
            files: RwLock::new(files),
            failed: Mutex::new(None),
            sync_lock: Mutex::new(()),
        });
        Ok((journal, ids))
    }

    fn file(&self, id: u64) -> Option<Arc<File>> {
        self.files
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .cloned()
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(file_name(id))
    }

    fn check(&self) -> Result<(), StorageError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn fail(&self, error: StorageError) -> StorageError {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get_or_insert(error).clone()
    }

    /// Makes every record appended so far durable: syncs the current file (earlier files were
    /// synced when the next one was created).
    pub(crate) fn sync(&self) -> Result<(), StorageError> {
        self.sync_file(self.current.load(Ordering::Acquire))
    }

    /// Syncs file `id`. A failed sync fails the journal for good: the kernel may have dropped
    /// the dirty pages, so nothing after it can be trusted.
    pub(crate) fn sync_file(&self, id: u64) -> Result<(), StorageError> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check()?;
        let Some(file) = self.file(id) else {
            return Ok(());
        };
        file.sync_data()
            .map_err(|error| self.fail(io_error("cannot sync", &self.path(id), error)))
    }

    /// Reads the framed value at `location` and returns its verified payload.
    pub(crate) fn read(
        &self,
        location: Location,
        what: impl Fn() -> String,
    ) -> Result<Vec<u8>, StorageError> {
        let file = self
            .file(location.file)
            .ok_or_else(|| StorageError::Malformed {
                what: what(),
                reason: "points into a journal file that does not exist",
            })?;
        let mut framed = vec![0u8; location.len as usize];
        file.read_exact_at(&mut framed, location.offset)
            .map_err(|error| {
                StorageError::Io(format!(
                    "cannot read {} at {}: {error}",
                    self.path(location.file).display(),
                    location.offset
                ))
            })?;
        let payload = unframe(&framed, what)?;
        Ok(payload.to_vec())
    }

    /// Reads the records of file `id` from `start`: calls `apply(body position, body)` for each
    /// whole record and returns the position just past the last one.
    pub(crate) fn scan(
        &self,
        id: u64,
        start: u64,
        mut apply: impl FnMut(Position, &[u8]) -> Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        let Some(file) = self.file(id) else {
            return Ok(start);
        };
        let path = self.path(id);
        let len = file
            .metadata()
            .map_err(|error| io_error("cannot stat", &path, error))?
            .len();
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &*file);
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(start))
            .map_err(|error| io_error("cannot seek", &path, error))?;
        let mut position = start;
        let mut body = Vec::new();
        loop {
            if len.saturating_sub(position) < HEADER_LEN {
                return Ok(position);
            }
            let mut header = [0u8; HEADER_LEN as usize];
            std::io::Read::read_exact(&mut reader, &mut header)
                .map_err(|error| io_error("cannot read", &path, error))?;
            let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let body_len = u64::from(u32::from_le_bytes(header[4..8].try_into().expect("4")));
            let crc = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
            if magic != MAGIC || len - position - HEADER_LEN < body_len {
                return Ok(position);
            }
            body.resize(body_len as usize, 0);
            std::io::Read::read_exact(&mut reader, &mut body)
                .map_err(|error| io_error("cannot read", &path, error))?;
            if crc32c::crc32c(&body) != crc {
                return Ok(position);
            }
            let body_at = Position {
                file: id,
                offset: position + HEADER_LEN,
            };
            apply(body_at, &body)?;
            position += HEADER_LEN + body_len;
        }
    }

    /// The length of file `id` in bytes (0 if it does not exist).
    pub(crate) fn len(&self, id: u64) -> Result<u64, StorageError> {
        let Some(file) = self.file(id) else {
            return Ok(0);
        };
        file.metadata()
            .map(|metadata| metadata.len())
            .map_err(|error| io_error("cannot stat", &self.path(id), error))
    }

    /// The file being appended.
    pub(crate) fn current_file(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// The ids of the files before `below` (never the file being appended), oldest first.
    pub(crate) fn ids_below(&self, below: u64) -> Vec<u64> {
        let below = below.min(self.current_file());
        self.files
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .range(..below)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Deletes files `ids` (never the file being appended or a later one), then syncs the
    /// directory. Readers holding one of them finish their read (the file lives until its last
    /// handle closes).
    pub(crate) fn remove_files(&self, ids: &[u64]) -> Result<JournalRemoval, StorageError> {
        let current = self.current_file();
        let mut removed = JournalRemoval::default();
        for &id in ids.iter().filter(|id| **id < current) {
            let Some(file) = self.file(id) else {
                continue;
            };
            let path = self.path(id);
            let bytes = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            std::fs::remove_file(&path).map_err(|error| io_error("cannot remove", &path, error))?;
            self.files
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&id);
            removed.files += 1;
            removed.bytes += bytes;
        }
        if removed.files > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Cuts file `id` at `len` (a torn tail) and syncs it.
    pub(crate) fn truncate(&self, id: u64, len: u64) -> Result<(), StorageError> {
        let Some(file) = self.file(id) else {
            return Ok(());
        };
        let path = self.path(id);
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(|error| io_error("cannot truncate", &path, error))
    }
}

/// What [`crate::Store::remove_unused_journal_files`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalRemoval {
    /// Files deleted.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The writer thread's handle: appends records, rotates files.
pub(crate) struct JournalWriter {
    journal: Arc<Journal>,
    file: Arc<File>,
    id: u64,
    len: u64,
    /// Size at which the next record goes to a new file (`StoreOptions::journal_file_bytes`).
    file_bytes: u64,
}

impl JournalWriter {
    /// Continues the journal at the end of its last file (`len` bytes of whole records), or
    /// starts file 1.
    pub(crate) fn new(
        journal: Arc<Journal>,
        last: Option<(u64, u64)>,
        file_bytes: u64,
    ) -> Result<JournalWriter, StorageError> {
        let (id, len, file) = match last.and_then(|(id, len)| Some((id, len, journal.file(id)?))) {
            Some(last) => last,
            None => (1, 0, create(&journal, 1)?),
        };
        Ok(JournalWriter {
            journal,
            file,
            id,
            len,
            file_bytes,
        })
    }

    /// The position the next record will start at.
    pub(crate) fn end(&self) -> Position {
        Position {
            file: self.id,
            offset: self.len,
        }
    }

    /// Syncs the current file, then creates the next one.
    fn rotate(&mut self) -> Result<(), StorageError> {
        self.journal.sync_file(self.id)?;
        self.file = create(&self.journal, self.id + 1)?;
        self.id += 1;
        self.len = 0;
        Ok(())
    }

    /// Appends `record` (its first `HEADER_LEN` bytes reserved by [`start_record`], filled in
    /// here) and returns the position of its body. On a failed write the file is cut back, so a later
    /// record never follows a torn one; if that fails too the journal fails for good.
    pub(crate) fn append(&mut self, record: &mut [u8]) -> Result<Position, StorageError> {
        self.journal.check()?;
        let record_len = record.len() as u64;
        if self.len > 0 && self.len + record_len > self.file_bytes {
            self.rotate()?;
        }
        let body_len = u32::try_from(record_len - HEADER_LEN).map_err(|_| {
            StorageError::Io(format!("journal record of {record_len} bytes is too large"))
        })?;
        let crc = crc32c::crc32c(&record[HEADER_LEN as usize..]);
        record[..4].copy_from_slice(&MAGIC.to_le_bytes());
        record[4..8].copy_from_slice(&body_len.to_le_bytes());
        record[8..12].copy_from_slice(&crc.to_le_bytes());
        let start = self.len;
        let path = self.journal.path(self.id);
        if let Err(error) = self.file.write_all_at(record, start) {
            let error = io_error("cannot write", &path, error);
            if let Err(cut) = self.file.set_len(start) {
                return Err(self.journal.fail(io_error(
                    "cannot cut back after a failed write",
                    &path,
                    cut,
                )));
            }
            return Err(error);
        }
        self.len += record_len;
        Ok(Position {
            file: self.id,
            offset: start + HEADER_LEN,
        })
    }

    /// Removes the last record, whose body starts at `body_at` (as [`JournalWriter::append`]
    /// returned it) and which could not be applied to RocksDB, so that a write reported failed never comes back at the
    /// next open. If the file cannot be cut the journal fails for good.
    pub(crate) fn cut_back(&mut self, body_at: Position) -> Result<(), StorageError> {
        let start = body_at.offset - HEADER_LEN;
        debug_assert_eq!(
            body_at.file, self.id,
            "the last record is in the current file"
        );
        let path = self.journal.path(self.id);
        self.file.set_len(start).map_err(|error| {
            self.journal.fail(io_error(
                "cannot cut back after a failed apply",
                &path,
                error,
            ))
        })?;
        self.len = start;
        Ok(())
    }
}

/// Creates journal file `id`, syncs the directory and makes it the file being appended.
fn create(journal: &Journal, id: u64) -> Result<Arc<File>, StorageError> {
    let path = journal.path(id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|error| io_error("cannot create", &path, error))?;
    if let Err(error) = sync_dir(&journal.dir) {
        // The file may or may not survive a crash: stop here rather than write into it.
        let _ = std::fs::remove_file(&path);
        return Err(journal.fail(error));
    }
    let file = Arc::new(file);
    journal
        .files
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(id, file.clone());
    journal.current.store(id, Ordering::Release);
    Ok(file)
}

/// Appends `op` to a record body. Layout: tag (1), column family (1), then for a put
/// `key len (2) ++ key ++ value len (4) ++ value` (a raw put too), for a range delete
/// `from len (2) ++ from ++ to len (2) ++ to`, for a delete `key len (2) ++ key`.
pub(crate) fn encode_op(body: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Put { cf, key, value } | Op::PutRaw { cf, key, value } => {
            body.push(if matches!(op, Op::Put { .. }) {
                OP_PUT
            } else {
                OP_PUT_RAW
            });
            body.push(cf.tag());
            body.extend_from_slice(&(key.len() as u16).to_le_bytes());
            body.extend_from_slice(key);
            body.extend_from_slice(&(value.len() as u32).to_le_bytes());
            body.extend_from_slice(value);
        }
        Op::Delete { cf, key } => {
            body.push(OP_DELETE);
            body.push(cf.tag());
            body.extend_from_slice(&(key.len() as u16).to_le_bytes());
            body.extend_from_slice(key);
        }
        Op::DeleteRange { cf, from, to } => {
            body.push(OP_DELETE_RANGE);
            body.push(cf.tag());
            body.extend_from_slice(&(from.len() as u16).to_le_bytes());
            body.extend_from_slice(from);
            body.extend_from_slice(&(to.len() as u16).to_le_bytes());
            body.extend_from_slice(to);
        }
    }
}

/// One op of a record body, borrowed from it. `value_at` is the journal offset of a put's value.
pub(crate) enum BodyOp<'a> {
    Put {
        cf: Cf,
        key: &'a [u8],
        value: &'a [u8],
        value_at: u64,
    },
    PutRaw {
        cf: Cf,
        key: &'a [u8],
        value: &'a [u8],
    },
    DeleteRange {
        cf: Cf,
        from: &'a [u8],
        to: &'a [u8],
    },
    Delete {
        cf: Cf,
        key: &'a [u8],
    },
}

/// Decodes the ops of a record body whose first byte is at `at`.
pub(crate) fn decode_body(at: Position, body: &[u8]) -> Result<Vec<BodyOp<'_>>, StorageError> {
    let malformed = |reason| StorageError::Malformed {
        what: format!("journal file {} record at {}", at.file, at.offset),
        reason,
    };
    let mut ops = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let head = take(&mut rest, 2).ok_or_else(|| malformed("op header cut short"))?;
        let cf = Cf::from_tag(head[1]).ok_or_else(|| malformed("unknown column family"))?;
        let short = || malformed("op cut short");
        let len16 = |rest: &mut &[u8]| -> Option<usize> {
            take(rest, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        };
        match head[0] {
            OP_PUT | OP_PUT_RAW => {
                let key_len = len16(&mut rest).ok_or_else(short)?;
                let key = take(&mut rest, key_len).ok_or_else(short)?;
                let value_len = take(&mut rest, 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                    .ok_or_else(short)?;
                let value_at = at.offset + (body.len() - rest.len()) as u64;
                let value = take(&mut rest, value_len).ok_or_else(short)?;
                ops.push(if head[0] == OP_PUT {
                    BodyOp::Put {
                        cf,
                        key,
                        value,
                        value_at,
                    }
                } else {
                    BodyOp::PutRaw { cf, key, value }
                });
            }
            OP_DELETE_RANGE => {
                let from_len = len16(&mut rest).ok_or_else(short)?;
                let from = take(&mut rest, from_len).ok_or_else(short)?;
                let to_len = len16(&mut rest).ok_or_else(short)?;
                let to = take(&mut rest, to_len).ok_or_else(short)?;
                ops.push(BodyOp::DeleteRange { cf, from, to });
            }
            OP_DELETE => {
                let key_len = len16(&mut rest).ok_or_else(short)?;
                let key = take(&mut rest, key_len).ok_or_else(short)?;
                ops.push(BodyOp::Delete { cf, key });
            }
            _ => return Err(malformed("unknown op")),
        }
    }
    Ok(ops)
}

/// Splits the first `n` bytes off `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

/// The RocksDB value of a log entry whose framed value is stored at `location`.
pub(crate) fn log_pointer(location: Location) -> Vec<u8> {
    frame(&location.encode())
}

/// Empties `record` and reserves its header, for [`JournalWriter::append`]; the body follows.
pub(crate) fn start_record(record: &mut Vec<u8>) {
    record.clear();
    record.extend_from_slice(&[0u8; HEADER_LEN as usize]);
}
