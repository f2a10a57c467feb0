//! Durable state in SQLite (WAL mode, `synchronous = FULL`): the task, every
//! committed round's global state and per-round metadata, the privacy
//! report (σ, q, steps, clip norm, δ, ε spent) of every update a committed
//! round aggregated, and which participant id belongs to which participant
//! key (by the key's SHA-256, never the key).
//!
//! Every update the round that is collecting accepted is written
//! (`pending_updates`) before the participant is told it was accepted, so an
//! accepted update survives `kill -9` and power loss too; it is deleted in
//! the transaction that commits its round, with `secure_delete` on and the
//! write-ahead log truncated after every commit, so a participant's own R
//! stays on disk only while its round is open.
//!
//! A round is committed by one transaction, its updates' privacy reports
//! included; the server broadcasts it only after that transaction returned,
//! so whatever a participant has seen survives `kill -9` and power loss.
//!
//! The schema is versioned by `PRAGMA user_version`: [`SCHEMA`] is version 0
//! (what the first releases created), and [`MIGRATIONS`] bring any older
//! database up to [`SCHEMA_VERSION`] when it is opened, each in one
//! transaction, keeping every row.
//!
//! The read-write [`Store::open`] holds an exclusive lock on
//! `<state_dir>/<task id>.lock` (with the holder's pid in it) for as long as
//! the store lives, so a second `fedsb serve` on the same state refuses to
//! start instead of writing rounds beside the first. The read-only
//! [`Store::open_read_only`] (`fedsb export`) takes no lock.
//!
//! The SHA-256 of the files a committed round's R only means something with
//! (`model.safetensors`, the adapter file with A and B) are pinned in
//! `pinned_files` ([`Store::pinned_files`]), so that a restart or an export
//! with other files is refused instead of pairing stored rounds with them.
//!
//! The index of the next demo shard `/api/demo-shard` hands out is kept in
//! `demo_shards` ([`Store::take_demo_shard`]), so that volunteers after a
//! restart get other rows than those before it.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fedsb_protocol::{
    AdapterState, ClientMessage, ClientUpdate, ParticipantId, RoundId, ServerMessage,
};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::round::Contribution;

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not a `#[source]`: the coordinator logs store errors by their
    /// message alone, which must name the cause.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error(
        "database {path} holds task {stored_id:?} with a different configuration \
         ({differences}); use another --state-dir or restore the original configuration"
    )]
    TaskMismatch {
        path: PathBuf,
        stored_id: String,
        /// The differing keys with both values, `; `-separated.
        differences: String,
    },
    #[error(
        "another fedsb serve (pid {pid}) is using {path} (it holds the lock file {lock}); \
         stop it first, or give this one another --state-dir"
    )]
    Locked {
        path: PathBuf,
        lock: PathBuf,
        /// The holder's pid as it wrote it, or `unknown`.
        pid: String,
    },
    #[error("cannot lock the state with {path}: {error}")]
    Lock {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `message` names the path and the cause.
    #[error("cannot pin {name}: {message}")]
    Pin {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("stored global state of round {round} is corrupt: {message}")]
    Corrupt { round: u64, message: String },
    #[error("database task panicked")]
    Join,
    #[error(
        "no state database {path}: this task has not run with this state directory \
         (check --state-dir or [server] state_dir)"
    )]
    Missing { path: PathBuf },
    /// The database could not be read (`fedsb export`): not a database,
    /// damaged, or unreadable; the message names the file.
    #[error("cannot read the state database {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error(
        "database {path} has schema version {found}, newer than this fedsb understands \
         ({supported}); use a newer fedsb"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

/// A committed round as stored.
#[derive(Debug, Clone)]
pub struct CommittedRound {
    pub meta: RoundMeta,
    /// The `GlobalModel` frame exactly as broadcast.
    pub frame: Vec<u8>,
    pub adapter: AdapterState,
}

/// Per-round metadata, as listed by `/api/rounds`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundMeta {
    pub round: u64,
    pub opened_unix_ms: u64,
    pub committed_unix_ms: u64,
    pub duration_ms: u64,
    pub aggregation_ms: u64,
    pub participants: u32,
    pub total_samples: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub mean_train_loss: Option<f64>,
    pub global_sha256: String,
}

impl RoundMeta {
    /// Round 0 of a task that starts from an adapter file: the initial
    /// `GlobalModel` `frame`, written at `now_unix_ms`, with no participants.
    pub fn initial(frame: &[u8], now_unix_ms: u64) -> Self {
        Self {
            round: 0,
            opened_unix_ms: now_unix_ms,
            committed_unix_ms: now_unix_ms,
            duration_ms: 0,
            aggregation_ms: 0,
            participants: 0,
            total_samples: 0,
            bytes_in: 0,
            bytes_out: 0,
            mean_train_loss: None,
            global_sha256: sha256_hex(frame),
        }
    }
}

/// Handle to the database; cheap to clone. Every call runs on a blocking
/// thread so the async runtime never waits on disk.
#[derive(Clone, Debug)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// The locked `<task id>.lock` of a read-write store: the lock lasts as
    /// long as the last clone.
    _lock: Option<Arc<File>>,
    /// Whether this open created the database file.
    created: bool,
    /// A file to pin when round 0 is committed ([`Store::pin_with_round_zero`]).
    pin_at_round_zero: Arc<Mutex<Option<(String, PathBuf)>>>,
}

/// A served file's SHA-256 as the task's database pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedFile {
    /// The name it is served under (`model.safetensors`, `adapter.safetensors`).
    pub name: String,
    /// Where it was when it was pinned (for messages; the hash is what counts).
    pub path: PathBuf,
    pub sha256: String,
}

/// Schema version 0, as the first releases created it. Never edit: later
/// changes go into [`MIGRATIONS`].
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS task (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    task_id TEXT NOT NULL,
    identity_json TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    opened_unix_ms INTEGER NOT NULL,
    committed_unix_ms INTEGER NOT NULL,
    aggregation_ms INTEGER NOT NULL,
    participants INTEGER NOT NULL,
    total_samples INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    mean_train_loss REAL,
    global_sha256 TEXT NOT NULL,
    global_frame BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS round_participants (
    round INTEGER NOT NULL REFERENCES rounds(round),
    participant_id INTEGER NOT NULL,
    client TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    weight REAL NOT NULL,
    frame_bytes INTEGER NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    train_loss REAL,
    noise_multiplier REAL,
    sample_rate REAL,
    dp_steps INTEGER,
    epsilon_spent REAL,
    PRIMARY KEY (round, participant_id)
);
CREATE TABLE IF NOT EXISTS round_eval (
    round INTEGER NOT NULL REFERENCES rounds(round),
    eval_set TEXT NOT NULL,
    accuracy REAL NOT NULL,
    loss REAL NOT NULL,
    samples INTEGER NOT NULL,
    seconds REAL NOT NULL,
    evaluated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (round, eval_set)
);
"#;

/// `MIGRATIONS[v]` takes a database from schema version `v` to `v + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the δ and clip norm of each update's privacy report, so that the
    // per-participant ε shown by `/api/status` can be restored after a
    // restart. Rows written before stay as they were (δ and clip unknown:
    // NULL); σ, q, steps and ε spent were stored from the start.
    "ALTER TABLE round_participants ADD COLUMN delta REAL;
     ALTER TABLE round_participants ADD COLUMN clip_norm REAL;",
    // 2: stable participant ids for participant keys, and the updates the
    // collecting round accepted (until it commits), so that neither a
    // restart nor a reconnect loses or double-counts an accepted update.
    "CREATE TABLE participant_keys (
         key_sha256 TEXT PRIMARY KEY,
         participant_id INTEGER NOT NULL UNIQUE,
         created_unix_ms INTEGER NOT NULL
     );
     CREATE TABLE pending_updates (
         round INTEGER NOT NULL,
         participant_id INTEGER NOT NULL,
         seq INTEGER NOT NULL,
         client TEXT NOT NULL,
         frame_bytes INTEGER NOT NULL,
         received_unix_ms INTEGER NOT NULL,
         update_frame BLOB NOT NULL,
         PRIMARY KEY (round, participant_id)
     );",
    // 3: the confusion matrix of each evaluation (JSON, label × predicted),
    // so that `/api/rounds` shows which classes a round's model gets wrong.
    // Evaluations stored before have none (NULL).
    "ALTER TABLE round_eval ADD COLUMN confusion_json TEXT;",
    // 4: the SHA-256 of the files the task's rounds are only meaningful with
    // (the model's weights, the adapter file with A and B), pinned at the
    // first start that serves them. Databases from before pin them at their
    // next start.
    "CREATE TABLE pinned_files (
         name TEXT PRIMARY KEY,
         path TEXT NOT NULL,
         sha256 TEXT NOT NULL,
         pinned_unix_ms INTEGER NOT NULL
     );",
    // 5: the next shard of the demo data that `/api/demo-shard` hands out,
    // so that a restart goes on with the next shard instead of handing the
    // first ones out again. Databases from before start at shard 0.
    "CREATE TABLE IF NOT EXISTS demo_shards (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         next_shard INTEGER NOT NULL
     );
     INSERT OR IGNORE INTO demo_shards (id, next_shard) VALUES (1, 0);",
    // 6: the ε the aggregator itself accounted for each update's participant
    // after that update (all its accepted updates up to it), so that a
    // restart reads it back instead of accounting every participant again,
    // and an exported round names the accounted ε of its participants.
    // Rows written before have none (NULL): they are accounted again.
    "ALTER TABLE round_participants ADD COLUMN epsilon_accounted REAL;",
];

/// How long a statement waits for another connection's write (a running
/// `fedsb serve` beside `fedsb export`) before it fails.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the database's task row is this task: `false` when it has none
/// yet, an error when it is another task or another configuration.
/// A read-only connection to the database at `path` and its schema
/// version (reading it makes SQLite open the file for real); `immutable`
/// reads the file alone, without locks, the shared-memory file or a
/// write-ahead log.
fn read_only_connection(path: &Path, immutable: bool) -> rusqlite::Result<(Connection, i64)> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if immutable {
        Connection::open_with_flags(
            format!("{}?immutable=1", url_path(path)),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )?
    } else {
        Connection::open_with_flags(path, flags)?
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    Ok((conn, version))
}

/// [`Store::open_read_only`] when SQLite could not open the database
/// (`first`): a WAL database is read through its shared-memory file, which
/// SQLite must create when no server has it open, and that fails without
/// write access to the state directory (another user, a read-only backup).
/// With no write-ahead log left (a server that stopped cleanly checkpoints
/// and removes it) the file alone is the whole database, read as immutable;
/// a log that holds data is refused, since the file alone would be stale.
fn read_immutable(path: &Path, first: rusqlite::Error) -> Result<(Connection, i64), StoreError> {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
    if wal_bytes > 0 {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Err(StoreError::Unreadable {
            path: path.to_owned(),
            message: format!(
                "{first}; its write-ahead log {} holds {wal_bytes} bytes not yet in the \
                 database, which only a reader with write access to {} can see (or a \
                 server that opens and closes it)",
                wal.display(),
                dir.display()
            ),
        });
    }
    read_only_connection(path, true).map_err(|_| StoreError::Unreadable {
        path: path.to_owned(),
        message: first.to_string(),
    })
}

/// `path` as an SQLite `file:` URI, the characters a URI reserves
/// percent-encoded.
fn url_path(path: &Path) -> String {
    let mut url = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' | '?' | '#' => url.push_str(&format!("%{:02X}", u32::from(c))),
            _ => url.push(c),
        }
    }
    url
}

fn same_task(
    conn: &Connection,
    path: &Path,
    task_id: &str,
    identity_json: &str,
) -> Result<bool, StoreError> {
    let stored: Option<(String, String)> = conn
        .query_row(
            "SELECT task_id, identity_json FROM task WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    // (Stored identities from before a rule that leaves a key out compare
    // as this version would have written them.)
    let stored = stored.map(|(id, identity)| (id, crate::config::canonical_identity(&identity)));
    match stored {
        Some((id, identity)) if id != task_id || identity != identity_json => {
            let mut differences = Vec::new();
            if id != task_id {
                differences.push(format!("task id: stored {id:?}, now {task_id:?}"));
            }
            let mut keys = identity_differences(&identity, identity_json);
            // DP turned on or off: its ε, δ and C of the side without DP are
            // placeholders, not settings worth listing.
            if keys.iter().any(|k| k.starts_with("privacy.enabled:")) {
                keys.retain(|k| !k.starts_with("privacy.") || k.starts_with("privacy.enabled:"));
            }
            differences.extend(keys);
            if differences.is_empty() {
                differences.push("the same keys and values, written differently".into());
            }
            Err(StoreError::TaskMismatch {
                path: path.to_owned(),
                stored_id: id,
                differences: differences.join("; "),
            })
        }
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

/// The keys (dotted paths) whose values differ between two identity JSONs,
/// each as `key: stored X, now Y` (`none` for a key one of them lacks).
/// Arrays and other values are compared whole.
fn identity_differences(stored: &str, now: &str) -> Vec<String> {
    use serde_json::Value;
    let parse = |s: &str| serde_json::from_str::<Value>(s);
    let (Ok(stored), Ok(now)) = (parse(stored), parse(now)) else {
        return vec![format!("identity: stored {stored}, now {now}")];
    };
    fn walk(key: &str, stored: Option<&Value>, now: Option<&Value>, out: &mut Vec<String>) {
        if let (Some(Value::Object(a)), Some(Value::Object(b))) = (stored, now) {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                walk(&sub, a.get(k), b.get(k), out);
            }
            return;
        }
        if stored != now {
            let show = |v: Option<&Value>| v.map_or_else(|| "none".to_owned(), Value::to_string);
            let key = if key.is_empty() { "identity" } else { key };
            out.push(format!("{key}: stored {}, now {}", show(stored), show(now)));
        }
    }
    let mut out = Vec::new();
    walk("", Some(&stored), Some(&now), &mut out);
    out
}

/// Takes the exclusive lock of a task's state, `<state_dir>/<task_id>.lock`,
/// and writes this process's pid into it; refuses when another process
/// holds it.
fn lock_state(state_dir: &Path, task_id: &str, database: &Path) -> Result<File, StoreError> {
    let path = state_dir.join(format!("{task_id}.lock"));
    let lock_err = |error| StoreError::Lock {
        path: path.clone(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(lock_err)?;
    // `File::try_lock` (an advisory lock, released when the file is closed,
    // the process killed included) is stable since Rust 1.89.
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StoreError::Locked {
                path: database.to_owned(),
                lock: path,
                pid: read_holder(&mut file).pid,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(lock_err)?;
    Ok(file)
}

/// The process holding a task's state, as its lock file names it: the pid
/// on the first line ("unknown" if none), and the address its server
/// listens on, on the second ([`Store::record_listener`]; absent while it
/// starts, and in the files of servers from before that line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHolder {
    pub pid: String,
    pub listen: Option<std::net::SocketAddr>,
}

fn read_holder(file: &mut File) -> StateHolder {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let mut lines = text.lines().map(str::trim);
    let pid = match lines.next() {
        None | Some("") => "unknown".to_owned(),
        Some(p) => p.to_owned(),
    };
    let listen = lines.next().and_then(|a| a.parse().ok());
    StateHolder { pid, listen }
}

/// The process that holds a task's state now, for `fedsb serve --check`:
/// what its lock file names, or `None` when no process holds the lock
/// (or there is no lock file). Creates and writes nothing. When no one holds
/// the lock it takes a shared one for an instant, so a server starting at
/// that very instant is refused as beside a second server, and can be
/// started again.
pub fn state_holder(state_dir: &Path, task_id: &str) -> Result<Option<StateHolder>, StoreError> {
    let path = state_dir.join(format!("{task_id}.lock"));
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(StoreError::Lock { path, error }),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => Ok(Some(read_holder(&mut file))),
        Err(std::fs::TryLockError::Error(error)) => Err(StoreError::Lock { path, error }),
    }
}

/// Whether a start could create `<state_dir>` (where it is missing) and
/// its files, for `fedsb serve --check`: makes a probe directory in
/// `state_dir`, or in its nearest existing parent, and removes it at once.
/// The error is the one [`Store::open`] would give.
pub fn check_state_dir(state_dir: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::CreateDir {
        path: state_dir.to_owned(),
        source,
    };
    let mut existing = state_dir;
    while !existing.as_os_str().is_empty() && !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new(""));
    }
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    if !existing.is_dir() {
        return Err(err(std::io::Error::other(format!(
            "{} is not a directory",
            existing.display()
        ))));
    }
    let probe = existing.join(format!(".fedsb-check-{}.probe", std::process::id()));
    std::fs::create_dir(&probe).map_err(err)?;
    let _ = std::fs::remove_dir(&probe);
    Ok(())
}

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Creates the version-0 tables where missing, then applies the migrations
/// the database lacks, each in its own transaction with its version bump.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    loop {
        let tx = conn.transaction()?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let Some(step) = MIGRATIONS.get(version as usize) else {
            return Ok(());
        };
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

/// One accepted update's privacy report, as stored with its round.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPrivacyReport {
    pub round: u64,
    pub participant: ParticipantId,
    pub client: String,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub steps: u64,
    /// `None` for updates stored before schema version 1.
    pub clip_norm: Option<f64>,
    /// `None` for updates stored before schema version 1.
    pub delta: Option<f64>,
    pub epsilon_spent: f64,
    /// The ε the aggregator accounted for the participant after this
    /// update; `None` for updates stored before schema version 6, and where
    /// no accountant bounded it.
    pub epsilon_accounted: Option<f64>,
}

/// An update the collecting round accepted, as written before the
/// participant was told so.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpdate {
    pub participant: ParticipantId,
    pub client: String,
    /// Acceptance order within the round (0, 1, …): restored updates are
    /// summed in this order, so the round's f64 sum is the one it had.
    pub seq: u64,
    pub frame_bytes: u64,
    pub received_unix_ms: u64,
    pub update: ClientUpdate,
}

impl Store {
    /// Opens (or creates) `<state_dir>/<task_id>.sqlite3` for a task, locked
    /// against a second `fedsb serve` (`<state_dir>/<task_id>.lock`) for as
    /// long as the store lives. A database made for a different task
    /// identity is refused.
    pub fn open(
        state_dir: &Path,
        task_id: &str,
        identity_json: &str,
        now_unix_ms: u64,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(format!("{task_id}.sqlite3"));
        let lock = lock_state(state_dir, task_id, &path)?;
        // Under the lock, so no other process creates it meanwhile.
        let created = !path.exists();
        let mut conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted pending updates (participants' own R) are overwritten.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        migrate(&mut conn, &path)?;
        if !same_task(&conn, &path, task_id, identity_json)? {
            conn.execute(
                "INSERT INTO task (id, task_id, identity_json, created_unix_ms) VALUES (1, ?1, ?2, ?3)",
                params![task_id, identity_json, now_unix_ms as i64],
            )?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
            _lock: Some(Arc::new(lock)),
            created,
            pin_at_round_zero: Arc::default(),
        })
    }

    /// Opens the existing database of a task read-only (`fedsb export`),
    /// beside a running `fedsb serve` or not: nothing is created or
    /// migrated, and a database of another task identity is refused as
    /// [`Store::open`] refuses it.
    pub fn open_read_only(
        state_dir: &Path,
        task_id: &str,
        identity_json: &str,
    ) -> Result<Self, StoreError> {
        let path = state_dir.join(format!("{task_id}.sqlite3"));
        if !path.is_file() {
            return Err(StoreError::Missing { path });
        }
        let (conn, version) = match read_only_connection(&path, false) {
            Ok(c) => c,
            Err(first) => read_immutable(&path, first)?,
        };
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let same = same_task(&conn, &path, task_id, identity_json).map_err(|e| match e {
            StoreError::Sqlite(e) => StoreError::Unreadable {
                path: path.clone(),
                message: e.to_string(),
            },
            e => e,
        })?;
        if !same {
            return Err(StoreError::Missing { path });
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
            _lock: None,
            created: false,
            pin_at_round_zero: Arc::default(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether [`Store::open`] created the database (it did not exist).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Adds the address the server listens on to the lock file, under its
    /// pid, so that `fedsb serve --check` beside it knows which port a
    /// restart frees ([`state_holder`]). Nothing for a read-only store.
    pub fn record_listener(&self, addr: std::net::SocketAddr) -> Result<(), StoreError> {
        use std::io::{Seek as _, SeekFrom};
        let Some(lock) = &self._lock else {
            return Ok(());
        };
        let mut file: &File = lock;
        let path = self.path.with_extension("lock");
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| write!(file, "{}\n{addr}\n", std::process::id()))
            .map_err(|error| StoreError::Lock { path, error })
    }

    /// The files the task's database pins, by name (none for a database
    /// from before schema version 4 that no server has opened since).
    pub async fn pinned_files(&self) -> Result<Vec<PinnedFile>, StoreError> {
        self.run(|conn| {
            // A read-only open does not migrate: an older database has no table.
            let has_table: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'pinned_files'",
                [],
                |r| r.get(0),
            )?;
            if !has_table {
                return Ok(Vec::new());
            }
            let mut stmt = conn.prepare("SELECT name, path, sha256 FROM pinned_files ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok(PinnedFile {
                    name: r.get(0)?,
                    path: PathBuf::from(r.get::<_, String>(1)?),
                    sha256: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Pins files that are not pinned yet; a name pinned already is an error.
    pub async fn pin_files(
        &self,
        files: Vec<PinnedFile>,
        now_unix_ms: u64,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction()?;
            for f in &files {
                insert_pin(&tx, f, now_unix_ms, false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Pins the file at `path` as `name` in the transaction that commits
    /// round 0, hashing it then: the federated initialization's adapter
    /// file, which the coordinator writes just before it commits round 0.
    /// A file that cannot be read fails that commit.
    pub fn pin_with_round_zero(&self, name: &str, path: PathBuf) {
        let mut pending = self
            .pin_at_round_zero
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *pending = Some((name.to_owned(), path));
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// Writes a committed round in one transaction: its global state, its
    /// metadata and each contribution with its privacy report.
    pub async fn commit_round(
        &self,
        meta: RoundMeta,
        frame: Vec<u8>,
        contributions: Vec<Contribution>,
    ) -> Result<(), StoreError> {
        let pin = match meta.round {
            0 => self
                .pin_at_round_zero
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            _ => None,
        };
        self.run(move |conn| {
            let pin = match pin {
                None => None,
                Some((name, path)) => {
                    let (sha256, _) = crate::files::hash_file(&path).map_err(|e| {
                        StoreError::Pin {
                            name: name.clone(),
                            path: path.clone(),
                            message: e.to_string(),
                        }
                    })?;
                    Some(PinnedFile { name, path, sha256 })
                }
            };
            let tx = conn.transaction()?;
            if let Some(pin) = &pin {
                insert_pin(&tx, pin, meta.committed_unix_ms, true)?;
            }
            tx.execute(
                "INSERT INTO rounds (round, opened_unix_ms, committed_unix_ms, aggregation_ms, participants,
                     total_samples, bytes_in, bytes_out, mean_train_loss, global_sha256, global_frame)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    meta.round as i64,
                    meta.opened_unix_ms as i64,
                    meta.committed_unix_ms as i64,
                    meta.aggregation_ms as i64,
                    meta.participants,
                    meta.total_samples as i64,
                    meta.bytes_in as i64,
                    meta.bytes_out as i64,
                    meta.mean_train_loss,
                    meta.global_sha256,
                    frame,
                ],
            )?;
            for c in &contributions {
                let p = c.privacy.as_ref();
                tx.execute(
                    "INSERT INTO round_participants (round, participant_id, client, num_samples, weight,
                         frame_bytes, received_unix_ms, train_loss, noise_multiplier, sample_rate, dp_steps,
                         epsilon_spent, delta, clip_norm, epsilon_accounted)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    params![
                        meta.round as i64,
                        c.participant.0 as i64,
                        c.client,
                        c.num_samples as i64,
                        c.weight,
                        c.frame_bytes as i64,
                        c.received_unix_ms as i64,
                        c.train_loss.map(f64::from),
                        p.map(|p| p.noise_multiplier),
                        p.map(|p| p.sample_rate),
                        p.map(|p| p.steps as i64),
                        p.map(|p| p.epsilon_spent),
                        p.map(|p| p.delta),
                        p.map(|p| p.clip_norm),
                        p.and(c.epsilon_accounted),
                    ],
                )?;
            }
            tx.execute(
                "DELETE FROM pending_updates WHERE round <= ?1",
                [meta.round as i64],
            )?;
            tx.commit()?;
            // Drop the deleted updates' pages from the write-ahead log too.
            // The commit is durable already; a busy log is checkpointed later.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "cannot truncate the write-ahead log after a commit");
            }
            Ok(())
        })
        .await
    }

    /// Writes an update the collecting round accepts; returns once it is
    /// durable. A second update of the same participant for the same round
    /// is an error (the round refuses it before).
    pub async fn put_pending(&self, round: RoundId, p: PendingUpdate) -> Result<(), StoreError> {
        self.run(move |conn| {
            let frame = ClientMessage::Update(p.update).encode();
            conn.execute(
                "INSERT INTO pending_updates (round, participant_id, seq, client, frame_bytes,
                     received_unix_ms, update_frame)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    round.0 as i64,
                    p.participant.0 as i64,
                    p.seq as i64,
                    p.client,
                    p.frame_bytes as i64,
                    p.received_unix_ms as i64,
                    frame,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// The updates accepted for `round` that are not committed yet, in the
    /// order they were accepted.
    pub async fn pending_updates(&self, round: RoundId) -> Result<Vec<PendingUpdate>, StoreError> {
        self.run(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT participant_id, seq, client, frame_bytes, received_unix_ms, update_frame
                 FROM pending_updates WHERE round = ?1 ORDER BY seq",
            )?;
            let rows = stmt.query_map([round.0 as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)? as u64,
                    r.get::<_, i64>(4)? as u64,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (participant, seq, client, frame_bytes, received_unix_ms, frame) = row?;
                let update = match ClientMessage::decode(&frame) {
                    Ok(ClientMessage::Update(u)) if u.round == round => u,
                    Ok(_) => {
                        return Err(StoreError::Corrupt {
                            round: round.0,
                            message: format!(
                                "the pending update of participant {participant} is not an update for this round"
                            ),
                        })
                    }
                    Err(e) => {
                        return Err(StoreError::Corrupt {
                            round: round.0,
                            message: format!(
                                "the pending update of participant {participant} does not decode: {e}"
                            ),
                        })
                    }
                };
                out.push(PendingUpdate {
                    participant: ParticipantId(participant),
                    client,
                    seq,
                    frame_bytes,
                    received_unix_ms,
                    update,
                });
            }
            Ok(out)
        })
        .await
    }

    /// The participant id of a participant key (given as its SHA-256):
    /// the stored one, or `fresh`, which is stored for it. Returns the id
    /// and whether it was stored before.
    pub async fn participant_for_key(
        &self,
        key_sha256: String,
        fresh: ParticipantId,
        now_unix_ms: u64,
    ) -> Result<(ParticipantId, bool), StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction()?;
            let stored: Option<i64> = tx
                .query_row(
                    "SELECT participant_id FROM participant_keys WHERE key_sha256 = ?1",
                    [&key_sha256],
                    |r| r.get(0),
                )
                .optional()?;
            let out = match stored {
                Some(id) => (ParticipantId(id as u64), true),
                None => {
                    tx.execute(
                        "INSERT INTO participant_keys (key_sha256, participant_id, created_unix_ms)
                         VALUES (?1, ?2, ?3)",
                        params![key_sha256, fresh.0 as i64, now_unix_ms as i64],
                    )?;
                    (fresh, false)
                }
            };
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// The last committed round, if any.
    pub async fn last_round(&self) -> Result<Option<CommittedRound>, StoreError> {
        self.committed_where("ORDER BY round DESC LIMIT 1", None)
            .await
    }

    /// Committed round `round`, if it is committed.
    pub async fn committed_round(
        &self,
        round: RoundId,
    ) -> Result<Option<CommittedRound>, StoreError> {
        self.committed_where("WHERE round = ?1", Some(round.0 as i64))
            .await
    }

    /// The committed round that `clause` (with `param` as `?1`) selects,
    /// decoded and checked against its checksum.
    async fn committed_where(
        &self,
        clause: &'static str,
        param: Option<i64>,
    ) -> Result<Option<CommittedRound>, StoreError> {
        self.run(move |conn| {
            let sql = format!("SELECT {META_COLUMNS}, global_frame FROM rounds {clause}");
            let row = |r: &rusqlite::Row<'_>| Ok((meta_from_row(r)?, r.get::<_, Vec<u8>>(10)?));
            let row = match param {
                Some(p) => conn.query_row(&sql, [p], row),
                None => conn.query_row(&sql, [], row),
            }
            .optional()?;
            row.map(|(meta, frame)| {
                let adapter = match ServerMessage::decode(&frame) {
                    Ok(ServerMessage::GlobalModel { adapter, .. }) => adapter,
                    Ok(_) => {
                        return Err(StoreError::Corrupt {
                            round: meta.round,
                            message: "stored frame is not a GlobalModel".into(),
                        })
                    }
                    Err(e) => {
                        return Err(StoreError::Corrupt {
                            round: meta.round,
                            message: e.to_string(),
                        })
                    }
                };
                if sha256_hex(&frame) != meta.global_sha256 {
                    return Err(StoreError::Corrupt {
                        round: meta.round,
                        message: "checksum mismatch".into(),
                    });
                }
                Ok(CommittedRound {
                    meta,
                    frame,
                    adapter,
                })
            })
            .transpose()
        })
        .await
    }

    /// Metadata of every committed round, oldest first.
    pub async fn rounds(&self) -> Result<Vec<RoundMeta>, StoreError> {
        self.run(|conn| {
            let mut stmt =
                conn.prepare(&format!("SELECT {META_COLUMNS} FROM rounds ORDER BY round"))?;
            let rows = stmt.query_map([], meta_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The privacy reports of every committed round's updates, oldest round
    /// first (participants in id order within a round).
    pub async fn privacy_reports(&self) -> Result<Vec<StoredPrivacyReport>, StoreError> {
        self.run(|conn| {
            let mut stmt = conn.prepare(
                "SELECT round, participant_id, client, noise_multiplier, sample_rate, dp_steps,
                        clip_norm, delta, epsilon_spent, epsilon_accounted
                 FROM round_participants
                 WHERE noise_multiplier IS NOT NULL AND sample_rate IS NOT NULL
                     AND dp_steps IS NOT NULL AND epsilon_spent IS NOT NULL
                 ORDER BY round, participant_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredPrivacyReport {
                    round: r.get::<_, i64>(0)? as u64,
                    participant: ParticipantId(r.get::<_, i64>(1)? as u64),
                    client: r.get(2)?,
                    noise_multiplier: r.get(3)?,
                    sample_rate: r.get(4)?,
                    steps: r.get::<_, i64>(5)? as u64,
                    clip_norm: r.get(6)?,
                    delta: r.get(7)?,
                    epsilon_spent: r.get(8)?,
                    epsilon_accounted: r.get(9)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Takes the next demo shard: returns its index and counts it as handed
    /// out, in one transaction, so that no two requests (and no request
    /// after a restart) get the same index.
    pub async fn take_demo_shard(&self) -> Result<u64, StoreError> {
        self.run(|conn| {
            let tx = conn.transaction()?;
            let k: i64 =
                tx.query_row("SELECT next_shard FROM demo_shards WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
            tx.execute(
                "UPDATE demo_shards SET next_shard = ?1 WHERE id = 1",
                [k + 1],
            )?;
            tx.commit()?;
            Ok(k as u64)
        })
        .await
    }

    /// The index of the next demo shard, without taking it (a HEAD request,
    /// the start-up's log).
    pub async fn next_demo_shard(&self) -> Result<u64, StoreError> {
        self.run(|conn| {
            let k: i64 =
                conn.query_row("SELECT next_shard FROM demo_shards WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
            Ok(k as u64)
        })
        .await
    }

    /// The `GlobalModel` frame of one committed round.
    pub async fn global_frame(&self, round: RoundId) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT global_frame FROM rounds WHERE round = ?1",
                    [round.0 as i64],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }
}

/// The evaluation of one committed global model on the task's eval set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundEval {
    pub round: u64,
    pub accuracy: f64,
    pub loss: f64,
    pub samples: u64,
    pub seconds: f64,
    pub evaluated_unix_ms: u64,
    /// `confusion[label][predicted]` in the order of the task's labels
    /// (none for an evaluation stored before schema version 3).
    pub confusion: Option<Vec<Vec<u64>>>,
}

/// A committed round with its evaluation (when one has finished), as listed
/// by `/api/rounds`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundSummary {
    #[serde(flatten)]
    pub meta: RoundMeta,
    pub eval: Option<RoundEval>,
}

impl Store {
    /// Records the evaluation of a round on the eval set named `eval_set`
    /// (a key of the file's content and the row limit); re-evaluating
    /// replaces it.
    pub async fn put_eval(&self, eval_set: String, e: RoundEval) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO round_eval (round, eval_set, accuracy, loss, samples, seconds, evaluated_unix_ms, confusion_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    e.round as i64,
                    eval_set,
                    e.accuracy,
                    e.loss,
                    e.samples as i64,
                    e.seconds,
                    e.evaluated_unix_ms as i64,
                    e.confusion
                        .as_ref()
                        .map(|c| serde_json::to_string(c).expect("a matrix of integers")),
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Committed rounds with no evaluation on `eval_set`, oldest first.
    pub async fn rounds_without_eval(&self, eval_set: String) -> Result<Vec<u64>, StoreError> {
        self.run(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT round FROM rounds WHERE round NOT IN
                     (SELECT round FROM round_eval WHERE eval_set = ?1) ORDER BY round",
            )?;
            let rows = stmt.query_map([eval_set], |r| r.get::<_, i64>(0))?;
            Ok(rows
                .map(|r| r.map(|v| v as u64))
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Every committed round, oldest first, with its evaluation on
    /// `eval_set` (none when `eval_set` is `None` or it is not done yet).
    pub async fn round_summaries(
        &self,
        eval_set: Option<String>,
    ) -> Result<Vec<RoundSummary>, StoreError> {
        self.run(move |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {META_COLUMNS}, accuracy, loss, samples, seconds, evaluated_unix_ms, confusion_json
                 FROM rounds LEFT JOIN
                     (SELECT round AS eval_round, accuracy, loss, samples, seconds, evaluated_unix_ms, confusion_json
                      FROM round_eval WHERE eval_set = ?1)
                 ON eval_round = round
                 ORDER BY round"
            ))?;
            let rows = stmt.query_map([eval_set.unwrap_or_default()], |r| {
                let meta = meta_from_row(r)?;
                let accuracy: Option<f64> = r.get(10)?;
                let eval = match accuracy {
                    None => None,
                    Some(accuracy) => Some(RoundEval {
                        round: meta.round,
                        accuracy,
                        loss: r.get(11)?,
                        samples: r.get::<_, i64>(12)? as u64,
                        seconds: r.get(13)?,
                        evaluated_unix_ms: r.get::<_, i64>(14)? as u64,
                        confusion: match r.get::<_, Option<String>>(15)? {
                            None => None,
                            Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(
                                    15,
                                    rusqlite::types::Type::Text,
                                    Box::new(e),
                                )
                            })?),
                        },
                    }),
                };
                Ok(RoundSummary { meta, eval })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

/// Writes one pin (replacing the name's pin when `replace`).
fn insert_pin(
    conn: &Connection,
    f: &PinnedFile,
    now_unix_ms: u64,
    replace: bool,
) -> Result<(), StoreError> {
    let verb = if replace {
        "INSERT OR REPLACE"
    } else {
        "INSERT"
    };
    conn.execute(
        &format!(
            "{verb} INTO pinned_files (name, path, sha256, pinned_unix_ms) VALUES (?1, ?2, ?3, ?4)"
        ),
        params![
            f.name,
            f.path.to_string_lossy(),
            f.sha256,
            now_unix_ms as i64
        ],
    )?;
    Ok(())
}

const META_COLUMNS: &str =
    "round, opened_unix_ms, committed_unix_ms, aggregation_ms, participants, \
     total_samples, bytes_in, bytes_out, mean_train_loss, global_sha256";

fn meta_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RoundMeta> {
    let opened: i64 = r.get(1)?;
    let committed: i64 = r.get(2)?;
    Ok(RoundMeta {
        round: r.get::<_, i64>(0)? as u64,
        opened_unix_ms: opened as u64,
        committed_unix_ms: committed as u64,
        duration_ms: committed.saturating_sub(opened).max(0) as u64,
        aggregation_ms: r.get::<_, i64>(3)? as u64,
        participants: r.get(4)?,
        total_samples: r.get::<_, i64>(5)? as u64,
        bytes_in: r.get::<_, i64>(6)? as u64,
        bytes_out: r.get::<_, i64>(7)? as u64,
        mean_train_loss: r.get(8)?,
        global_sha256: r.get(9)?,
    })
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedsb_protocol::PrivacyReport;

    const IDENTITY: &str = r#"{"task":"t"}"#;

    fn meta(round: u64, frame: &[u8]) -> RoundMeta {
        RoundMeta {
            round,
            opened_unix_ms: 1000 * round,
            committed_unix_ms: 1000 * round + 10,
            duration_ms: 10,
            aggregation_ms: 3,
            participants: 2,
            total_samples: 30,
            bytes_in: 400,
            bytes_out: 800,
            mean_train_loss: Some(0.5),
            global_sha256: sha256_hex(frame),
        }
    }

    fn contribution(participant: u64, privacy: Option<PrivacyReport>) -> Contribution {
        Contribution {
            participant: ParticipantId(participant),
            client: format!("client-{participant}"),
            num_samples: 15,
            weight: 15.0,
            frame_bytes: 200,
            received_unix_ms: 5,
            train_loss: Some(0.5),
            epsilon_accounted: privacy.as_ref().map(|p| p.epsilon_spent / 2.0),
            privacy,
        }
    }

    fn report(steps: u64, epsilon_spent: f64) -> PrivacyReport {
        PrivacyReport {
            noise_multiplier: 1.25,
            sample_rate: 0.0625,
            steps,
            clip_norm: 0.5,
            delta: 1e-6,
            epsilon_spent,
        }
    }

    fn user_version(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    /// An evaluation is read back as stored, its confusion matrix included,
    /// on its own eval set only; evaluating again replaces it.
    #[tokio::test]
    async fn evaluations_are_stored_and_listed_with_their_confusion_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        for n in 0..2 {
            let frame = format!("r{n}").into_bytes();
            store
                .commit_round(meta(n, &frame), frame.clone(), Vec::new())
                .await
                .unwrap();
        }
        let eval = |accuracy: f64, confusion: Option<Vec<Vec<u64>>>| RoundEval {
            round: 1,
            accuracy,
            loss: 0.5,
            samples: 10,
            seconds: 0.25,
            evaluated_unix_ms: 7,
            confusion,
        };
        let first = eval(0.7, Some(vec![vec![4, 1], vec![2, 3]]));
        store.put_eval("dev".into(), first.clone()).await.unwrap();
        assert_eq!(
            store.rounds_without_eval("dev".into()).await.unwrap(),
            vec![0]
        );
        let listed = store.round_summaries(Some("dev".into())).await.unwrap();
        assert_eq!(listed[0].eval, None);
        assert_eq!(listed[1].eval, Some(first));
        let other = store.round_summaries(Some("other".into())).await.unwrap();
        assert_eq!(other[1].eval, None);
        // In the API's JSON the matrix is a list of rows.
        let json = serde_json::to_value(&listed[1]).unwrap();
        assert_eq!(
            json["eval"]["confusion"],
            serde_json::json!([[4, 1], [2, 3]])
        );

        let again = eval(0.8, Some(vec![vec![5, 0], vec![2, 3]]));
        store.put_eval("dev".into(), again.clone()).await.unwrap();
        let listed = store.round_summaries(Some("dev".into())).await.unwrap();
        assert_eq!(listed[1].eval, Some(again));
        // Reopened, as after a restart.
        drop(store);
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        let listed = store.round_summaries(Some("dev".into())).await.unwrap();
        assert_eq!(
            listed[1].eval.as_ref().and_then(|e| e.confusion.clone()),
            Some(vec![vec![5, 0], vec![2, 3]])
        );
    }

    #[tokio::test]
    async fn privacy_reports_are_committed_with_their_round_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        assert_eq!(user_version(store.path()), SCHEMA_VERSION);
        assert!(store.privacy_reports().await.unwrap().is_empty());
        store
            .commit_round(meta(0, b"r0"), b"r0".to_vec(), Vec::new())
            .await
            .unwrap();
        store
            .commit_round(
                meta(1, b"r1"),
                b"r1".to_vec(),
                vec![
                    contribution(7, Some(report(4, 0.75))),
                    contribution(3, None),
                ],
            )
            .await
            .unwrap();
        store
            .commit_round(
                meta(2, b"r2"),
                b"r2".to_vec(),
                vec![
                    contribution(9, Some(report(5, 0.5))),
                    contribution(7, Some(report(4, 1.125))),
                ],
            )
            .await
            .unwrap();
        // A round that cannot be written (round 2 again) writes none of its
        // reports either.
        let failed = store
            .commit_round(
                meta(2, b"x"),
                b"x".to_vec(),
                vec![contribution(11, Some(report(1, 0.1)))],
            )
            .await;
        assert!(failed.is_err());
        drop(store);

        // Read back by a fresh open, as after a restart.
        let store = Store::open(dir.path(), "t", IDENTITY, 2).unwrap();
        let got = store.privacy_reports().await.unwrap();
        let want = |round, participant: u64, steps, epsilon_spent| StoredPrivacyReport {
            round,
            participant: ParticipantId(participant),
            client: format!("client-{participant}"),
            noise_multiplier: 1.25,
            sample_rate: 0.0625,
            steps,
            clip_norm: Some(0.5),
            delta: Some(1e-6),
            epsilon_spent,
            // The test's contributions carry half their reported ε.
            epsilon_accounted: Some(epsilon_spent / 2.0),
        };
        assert_eq!(
            got,
            vec![
                want(1, 7, 4, 0.75),
                want(2, 7, 4, 1.125),
                want(2, 9, 5, 0.5),
            ]
        );
        assert_eq!(store.rounds().await.unwrap().len(), 3);
    }

    fn pending(participant: u64, seq: u64, round: u64, value: f32) -> PendingUpdate {
        use fedsb_protocol::{AdapterState, Tensor};
        PendingUpdate {
            participant: ParticipantId(participant),
            client: format!("client-{participant}"),
            seq,
            frame_bytes: 321,
            received_unix_ms: 77,
            update: ClientUpdate {
                round: RoundId(round),
                num_samples: 12,
                train_loss: Some(0.25),
                privacy: Some(report(3, 0.5)),
                adapter: AdapterState {
                    r: vec![Tensor::new(vec![2, 2], vec![value, 1.0, 2.0, 3.0]).unwrap()],
                    head_weight: Tensor::new(vec![2, 1], vec![4.0, value]).unwrap(),
                    head_bias: Tensor::new(vec![2], vec![0.5, -0.5]).unwrap(),
                },
            },
        }
    }

    fn count_rows(path: &Path, table: &str) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// A new task's store in `dir` with round 0 committed.
    async fn store_at_round_zero(dir: &Path) -> Store {
        let store = Store::open(dir, "t", IDENTITY, 1).unwrap();
        store
            .commit_round(meta(0, b"r0"), b"r0".to_vec(), Vec::new())
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn pending_updates_survive_a_reopen_and_go_with_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_at_round_zero(dir.path()).await;
        // Accepted in the order 9, 4: restored in that order, not by id.
        store
            .put_pending(RoundId(1), pending(9, 0, 1, 1.5))
            .await
            .unwrap();
        store
            .put_pending(RoundId(1), pending(4, 1, 1, -2.5))
            .await
            .unwrap();
        // The same participant twice in one round is refused by the table.
        assert!(store
            .put_pending(RoundId(1), pending(9, 2, 1, 0.0))
            .await
            .is_err());
        drop(store);

        let store = Store::open(dir.path(), "t", IDENTITY, 2).unwrap();
        let got = store.pending_updates(RoundId(1)).await.unwrap();
        assert_eq!(got, vec![pending(9, 0, 1, 1.5), pending(4, 1, 1, -2.5)]);
        assert!(store.pending_updates(RoundId(2)).await.unwrap().is_empty());

        store
            .commit_round(meta(1, b"r1"), b"r1".to_vec(), vec![contribution(9, None)])
            .await
            .unwrap();
        assert!(store.pending_updates(RoundId(1)).await.unwrap().is_empty());
        assert_eq!(count_rows(store.path(), "pending_updates"), 0);
        // The write-ahead log was truncated after the commit: the deleted
        // updates are not left in it.
        let wal = dir.path().join("t.sqlite3-wal");
        let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert_eq!(wal_len, 0, "{} bytes left in the log", wal_len);
    }

    #[tokio::test]
    async fn a_participant_key_keeps_its_id_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        let k = sha256_hex(b"key one");
        assert_eq!(
            store
                .participant_for_key(k.clone(), ParticipantId(50), 1)
                .await
                .unwrap(),
            (ParticipantId(50), false)
        );
        assert_eq!(
            store
                .participant_for_key(k.clone(), ParticipantId(51), 2)
                .await
                .unwrap(),
            (ParticipantId(50), true)
        );
        drop(store);
        let store = Store::open(dir.path(), "t", IDENTITY, 3).unwrap();
        assert_eq!(
            store
                .participant_for_key(k, ParticipantId(99), 3)
                .await
                .unwrap(),
            (ParticipantId(50), true)
        );
        assert_eq!(
            store
                .participant_for_key(sha256_hex(b"key two"), ParticipantId(52), 3)
                .await
                .unwrap(),
            (ParticipantId(52), false)
        );
    }

    /// A database as the code before schema version 1 wrote it: the
    /// version-0 tables, `user_version` 0, a committed round with a DP update
    /// and one without a report.
    fn write_version_0_database(dir: &Path) -> PathBuf {
        let path = dir.join("t.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO task (id, task_id, identity_json, created_unix_ms) VALUES (1, 't', ?1, 1)",
            [IDENTITY],
        )
        .unwrap();
        for (round, frame) in [(0i64, b"r0"), (1, b"r1")] {
            conn.execute(
                "INSERT INTO rounds (round, opened_unix_ms, committed_unix_ms, aggregation_ms, participants,
                     total_samples, bytes_in, bytes_out, mean_train_loss, global_sha256, global_frame)
                 VALUES (?1, 0, 10, 3, 2, 30, 400, 800, 0.5, ?2, ?3)",
                params![round, sha256_hex(frame), frame.to_vec()],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO round_participants (round, participant_id, client, num_samples, weight,
                 frame_bytes, received_unix_ms, train_loss, noise_multiplier, sample_rate, dp_steps, epsilon_spent)
             VALUES (1, 42, 'old-dp', 15, 15.0, 200, 5, 0.5, 2.5, 0.125, 6, 0.875),
                    (1, 43, 'old-plain', 15, 15.0, 200, 5, 0.5, NULL, NULL, NULL, NULL);
             INSERT INTO round_eval (round, eval_set, accuracy, loss, samples, seconds, evaluated_unix_ms)
             VALUES (1, 'eval', 0.75, 0.5, 24, 0.1, 20);",
        )
        .unwrap();
        assert_eq!(user_version(&path), 0);
        path
    }

    #[tokio::test]
    async fn a_version_0_database_is_migrated_without_losing_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_version_0_database(dir.path());

        let store = Store::open(dir.path(), "t", IDENTITY, 2).unwrap();
        assert_eq!(store.path(), path);
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        // The old rows are all there.
        let rounds = store.rounds().await.unwrap();
        assert_eq!(
            rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(
            store.global_frame(RoundId(1)).await.unwrap(),
            Some(b"r1".to_vec())
        );
        let summaries = store.round_summaries(Some("eval".into())).await.unwrap();
        assert_eq!(summaries[1].eval.as_ref().map(|e| e.accuracy), Some(0.75));
        // An evaluation stored before schema version 3 has no confusion matrix.
        assert_eq!(
            summaries[1].eval.as_ref().map(|e| e.confusion.clone()),
            Some(None)
        );
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM round_participants", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        // The old DP report, with δ and clip unknown.
        assert_eq!(
            store.privacy_reports().await.unwrap(),
            vec![StoredPrivacyReport {
                round: 1,
                participant: ParticipantId(42),
                client: "old-dp".into(),
                noise_multiplier: 2.5,
                sample_rate: 0.125,
                steps: 6,
                clip_norm: None,
                delta: None,
                epsilon_spent: 0.875,
                // Not accounted before schema version 6.
                epsilon_accounted: None,
            }]
        );

        // New rounds write the new columns next to the old rows.
        store
            .commit_round(
                meta(2, b"r2"),
                b"r2".to_vec(),
                vec![contribution(42, Some(report(6, 1.5)))],
            )
            .await
            .unwrap();
        let got = store.privacy_reports().await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].delta, Some(1e-6));
        assert_eq!(got[1].clip_norm, Some(0.5));
        assert_eq!(got[1].epsilon_spent, 1.5);
        assert_eq!(got[1].epsilon_accounted, Some(0.75));
        // A database from before demo shards hands out shard 0 next.
        assert_eq!(store.next_demo_shard().await.unwrap(), 0);
        drop(store);

        // Opening again migrates nothing twice.
        let store = Store::open(dir.path(), "t", IDENTITY, 3).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        assert_eq!(store.privacy_reports().await.unwrap(), got);
    }

    /// A second read-write open of a task's state (a second `fedsb serve`)
    /// is refused while the first holds it, naming the holder's pid and the
    /// database; the read-only open of `fedsb export` works beside it; once
    /// the first is gone the state opens again.
    #[test]
    fn a_second_open_of_the_same_state_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        assert!(first.created());
        let clone = first.clone();
        let err = Store::open(dir.path(), "t", IDENTITY, 2).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        let want = format!(
            "another fedsb serve (pid {}) is using {}",
            std::process::id(),
            dir.path().join("t.sqlite3").display()
        );
        assert!(msg.contains(&want), "{msg}");
        assert!(msg.contains("t.lock"), "{msg}");
        // Another task in the same directory has its own lock.
        Store::open(dir.path(), "other", IDENTITY, 2).unwrap();
        Store::open_read_only(dir.path(), "t", IDENTITY).unwrap();
        drop(first);
        // The lock lasts as long as the last clone.
        assert!(matches!(
            Store::open(dir.path(), "t", IDENTITY, 2),
            Err(StoreError::Locked { .. })
        ));
        drop(clone);
        let again = Store::open(dir.path(), "t", IDENTITY, 3).unwrap();
        assert!(!again.created());
        let pid = std::fs::read_to_string(dir.path().join("t.lock")).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }

    /// The refusal of another configuration names the database and every
    /// key that differs, with both values.
    #[test]
    fn a_changed_identity_is_refused_naming_the_differing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let stored = r#"{"adapter":{"modules":["q","v"],"rank":8},"task":{"id":"t","rounds":3}}"#;
        drop(Store::open(dir.path(), "t", stored, 1).unwrap());
        let now = r#"{"adapter":{"modules":["q","v"],"rank":4},"task":{"id":"t","rounds":3,"lr_decay":0.5}}"#;
        let err = Store::open(dir.path(), "t", now, 2).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "database {} holds task \"t\" with a different configuration",
                dir.path().join("t.sqlite3").display()
            )),
            "{msg}"
        );
        assert!(
            msg.contains("(adapter.rank: stored 8, now 4; task.lr_decay: stored none, now 0.5)"),
            "{msg}"
        );
        assert!(!msg.contains("state directory"), "{msg}");
        let err = Store::open_read_only(dir.path(), "t", now).unwrap_err();
        assert!(
            err.to_string().contains("adapter.rank: stored 8, now 4"),
            "{err}"
        );
    }

    /// The lock file names the process holding the state and, once its
    /// server recorded it, the address it listens on (what `fedsb serve
    /// --check` beside it reads); no one holds a closed store's.
    #[test]
    fn the_lock_file_names_the_holder_and_its_address() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state_holder(dir.path(), "t").unwrap(), None);
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        let pid = std::process::id().to_string();
        assert_eq!(
            state_holder(dir.path(), "t").unwrap(),
            Some(StateHolder {
                pid: pid.clone(),
                listen: None
            })
        );
        let addr: std::net::SocketAddr = "127.0.0.1:4242".parse().unwrap();
        store.record_listener(addr).unwrap();
        assert_eq!(
            state_holder(dir.path(), "t").unwrap(),
            Some(StateHolder {
                pid,
                listen: Some(addr)
            })
        );
        drop(store);
        assert_eq!(state_holder(dir.path(), "t").unwrap(), None);
    }

    /// A task stored with DP off and its ε, δ and C in its identity (as
    /// before they were left out) resumes under this version's identity,
    /// which has them as zeros; with DP on they still count.
    #[test]
    fn a_dp_off_identity_stored_with_its_values_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = r#"{"privacy":{"clip_norm":0.1,"delta":1e-5,"enabled":false,"epsilon":3.0},"task":{"id":"t"}}"#;
        drop(Store::open(dir.path(), "t", legacy, 1).unwrap());
        let now = r#"{"privacy":{"clip_norm":0.0,"delta":0.0,"enabled":false,"epsilon":0.0},"task":{"id":"t"}}"#;
        drop(Store::open(dir.path(), "t", now, 2).unwrap());
        Store::open_read_only(dir.path(), "t", now).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let on = r#"{"privacy":{"clip_norm":0.1,"delta":1e-5,"enabled":true,"epsilon":3.0},"task":{"id":"t"}}"#;
        drop(Store::open(dir.path(), "t", on, 1).unwrap());
        let err = Store::open(dir.path(), "t", &on.replace("3.0", "5.0"), 2).unwrap_err();
        assert!(
            err.to_string()
                .contains("privacy.epsilon: stored 3.0, now 5.0"),
            "{err}"
        );
        // Turned off, only that is named (the zeros stand for nothing).
        let err = Store::open(dir.path(), "t", now, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("configuration (privacy.enabled: stored true, now false);"),
            "{err}"
        );
    }

    #[test]
    fn identity_differences_are_listed_by_dotted_key() {
        assert_eq!(
            identity_differences(
                r#"{"a":{"b":{"c":1,"d":[1,2]},"e":"x"},"f":null}"#,
                r#"{"a":{"b":{"c":2,"d":[1,2]},"e":"y"},"g":true}"#
            ),
            vec![
                "a.b.c: stored 1, now 2",
                "a.e: stored \"x\", now \"y\"",
                "f: stored null, now none",
                "g: stored none, now true",
            ]
        );
        assert!(identity_differences(r#"{"a":1}"#, r#"{"a":1}"#).is_empty());
    }

    /// Pins are written once, read back after a reopen and by a read-only
    /// open; a file to pin with round 0 is hashed and pinned in the
    /// transaction that commits round 0, and only then.
    #[tokio::test]
    async fn pinned_files_are_stored_and_round_zero_pins_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        assert!(store.pinned_files().await.unwrap().is_empty());
        let model = PinnedFile {
            name: "model.safetensors".into(),
            path: dir.path().join("model.safetensors"),
            sha256: sha256_hex(b"weights"),
        };
        store.pin_files(vec![model.clone()], 5).await.unwrap();
        // A name is pinned once.
        assert!(store.pin_files(vec![model.clone()], 6).await.is_err());

        let adapter = dir.path().join("t.adapter.safetensors");
        store.pin_with_round_zero("adapter.safetensors", adapter.clone());
        // The file is not there yet: round 0 cannot commit.
        let err = store
            .commit_round(meta(0, b"r0"), b"r0".to_vec(), Vec::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Pin { name, .. } if name == "adapter.safetensors"),
            "{err}"
        );
        assert!(store.rounds().await.unwrap().is_empty());
        std::fs::write(&adapter, b"A and B").unwrap();
        store
            .commit_round(meta(0, b"r0"), b"r0".to_vec(), Vec::new())
            .await
            .unwrap();
        // Later rounds pin nothing again.
        std::fs::write(&adapter, b"other").unwrap();
        store
            .commit_round(meta(1, b"r1"), b"r1".to_vec(), Vec::new())
            .await
            .unwrap();
        drop(store);

        let want = vec![
            PinnedFile {
                name: "adapter.safetensors".into(),
                path: adapter,
                sha256: sha256_hex(b"A and B"),
            },
            model,
        ];
        let store = Store::open(dir.path(), "t", IDENTITY, 2).unwrap();
        assert_eq!(store.pinned_files().await.unwrap(), want);
        let read_only = Store::open_read_only(dir.path(), "t", IDENTITY).unwrap();
        assert_eq!(read_only.pinned_files().await.unwrap(), want);
    }

    /// A stopped task's database that SQLite cannot open read-only (no
    /// write access to the state directory, where it must create the
    /// shared-memory file) is read as immutable when no write-ahead log
    /// holds data, and refused naming the log when one does; a damaged
    /// file's error names the file.
    #[tokio::test]
    async fn a_stopped_tasks_database_is_read_without_write_access() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_at_round_zero(dir.path()).await;
        drop(store);
        let db = dir.path().join("t.sqlite3");
        let wal = dir.path().join("t.sqlite3-wal");
        let refused = || {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                Some("attempt to write a readonly database".into()),
            )
        };
        let (conn, version) = read_immutable(&db, refused()).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let rounds: i64 = conn
            .query_row("SELECT COUNT(*) FROM rounds", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rounds, 1);
        drop(conn);

        std::fs::write(&wal, b"frames not yet checkpointed").unwrap();
        let err = read_immutable(&db, refused()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot read the state database {}", db.display()))
                && err.contains("attempt to write a readonly database")
                && err.contains(&format!("write-ahead log {} holds 27 bytes", wal.display())),
            "{err}"
        );
        std::fs::remove_file(&wal).unwrap();

        std::fs::write(&db, vec![7u8; 8192]).unwrap();
        let err = Store::open_read_only(dir.path(), "t", IDENTITY)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("cannot read the state database {}", db.display())),
            "{err}"
        );
    }

    /// The next demo shard is taken once per call, read without being
    /// taken, and goes on where it stopped after a reopen.
    #[tokio::test]
    async fn the_next_demo_shard_is_taken_once_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", IDENTITY, 1).unwrap();
        assert_eq!(store.next_demo_shard().await.unwrap(), 0);
        assert_eq!(store.take_demo_shard().await.unwrap(), 0);
        assert_eq!(store.take_demo_shard().await.unwrap(), 1);
        // Reading does not take it.
        assert_eq!(store.next_demo_shard().await.unwrap(), 2);
        assert_eq!(store.next_demo_shard().await.unwrap(), 2);
        drop(store);

        let store = Store::open(dir.path(), "t", IDENTITY, 2).unwrap();
        assert_eq!(store.next_demo_shard().await.unwrap(), 2);
        assert_eq!(store.take_demo_shard().await.unwrap(), 2);
        // Requests at the same time each get their own shard.
        let mut taken = futures_util::future::join_all((0..16).map(|_| {
            let store = store.clone();
            async move { store.take_demo_shard().await.unwrap() }
        }))
        .await;
        taken.sort_unstable();
        assert_eq!(taken, (3..19).collect::<Vec<u64>>());
        assert_eq!(store.next_demo_shard().await.unwrap(), 19);
    }

    /// `fedsb export` reads a database no server has migrated to pins yet:
    /// nothing is pinned.
    #[tokio::test]
    async fn a_database_from_before_pins_reads_as_pinning_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_version_0_database(dir.path());
        let store = Store::open_read_only(dir.path(), "t", IDENTITY).unwrap();
        assert!(store.pinned_files().await.unwrap().is_empty());
    }

    #[test]
    fn a_database_from_a_newer_fedsb_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_version_0_database(dir.path());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = Store::open(dir.path(), "t", IDENTITY, 2).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
    }
}
