// SPDX-License-Identifier: Apache-2.0
//! Root keys of the capability tokens: the signing key and the ring of trusted
//! public keys, kept in the data dir.
//!
//! ```text
//! <data-dir>/keys/            mode 0700
//! <data-dir>/keys/root.key    mode 0600  the current signing key (JSON, private)
//! <data-dir>/keys/trusted.json mode 0600 the key ring: every public key that
//!                                        may still verify tokens, with retirement
//! ```
//!
//! The key is created on first use. [`KeyStore::rotate`] makes a new signing
//! key and retires the old one: its public key stays in the ring, trusted until
//! `retired_at + max_token_ttl`, so every token minted under it stays valid
//! until it expires (a token never lives longer than `max_token_ttl`), and not
//! a second longer. A key file readable by group or others, or a ring writable
//! by them, or either with bad content, is refused with an error that names
//! the file and says what is wrong.
//!
//! Every token carries its root key id (biscuit's `root_key_id`): the first 4
//! bytes (LE) of SHA-256 of the public key. A token whose key id is not in the
//! ring is from another root (`WRONG_ROOT`); one whose key id is known but
//! whose signature fails is forged (`TOKEN_INVALID`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use biscuit_auth::{Algorithm, KeyPair, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a token may live at most unless the ring says otherwise (24 h).
pub const DEFAULT_MAX_TOKEN_TTL: u64 = 24 * 3600;

const KEY_FILE: &str = "root.key";
const RING_FILE: &str = "trusted.json";
const FORMAT_VERSION: u32 = 1;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, writing or creating a key file or folder failed.
    #[error("cannot access {}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A key file's mode lets others read (private key) or write (ring) it.
    #[error(
        "{} has mode {mode:o}; it must be {want} (fix with `chmod 600`)",
        .path.display()
    )]
    LoosePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What is required, in words.
        want: &'static str,
    },
    /// A key file is not a regular file (a symlink, a folder...).
    #[error("{} is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A key file does not hold what it should.
    #[error("{} is malformed: {reason}", .path.display())]
    BadContent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The ring has no entry for the signing key.
    #[error("the signing key {key_id:#010x} is missing from the key ring {}", .path.display())]
    SigningKeyNotTrusted {
        /// The signing key's id.
        key_id: u32,
        /// The ring file.
        path: PathBuf,
    },
}

/// The key id of a public key: SHA-256 of its bytes, first 4 bytes, little-endian.
pub fn key_id(public: &PublicKey) -> u32 {
    let digest = Sha256::digest(public.to_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// One trusted public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKey {
    /// The key id tokens carry.
    pub key_id: u32,
    /// Always `ed25519`.
    pub algorithm: String,
    /// The public key, hex.
    pub public_key: String,
    /// When the key was made (Unix seconds).
    pub created_at: u64,
    /// When it stopped signing (Unix seconds); `None` while it signs.
    pub retired_at: Option<u64>,
    /// Tokens under it verify until this time (Unix seconds); `None`: no end.
    pub trusted_until: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RingFile {
    version: u32,
    max_token_ttl: u64,
    keys: Vec<TrustedKey>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    key_id: u32,
    algorithm: String,
    private_key: String,
    created_at: u64,
}

/// Why the ring did not give a key for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingMiss {
    /// The token carries no root key id.
    NoKeyId,
    /// No key with that id is in the ring.
    Unknown(u32),
    /// The key was retired and its grace period is over.
    Retired(u32),
}

/// The trusted public keys: all a host needs to verify tokens offline.
#[derive(Debug, Clone)]
pub struct KeyRing {
    keys: Vec<(TrustedKey, PublicKey)>,
    max_token_ttl: u64,
}

impl KeyRing {
    /// A ring holding one key that never retires (for verifiers in tests and tools).
    pub fn single(public: PublicKey, max_token_ttl: u64) -> KeyRing {
        let entry = TrustedKey {
            key_id: key_id(&public),
            algorithm: "ed25519".into(),
            public_key: public.to_bytes_hex(),
            created_at: 0,
            retired_at: None,
            trusted_until: None,
        };
        KeyRing {
            keys: vec![(entry, public)],
            max_token_ttl,
        }
    }

    /// Loads a ring file (`<data-dir>/keys/trusted.json`), refusing one that
    /// group or others may write.
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        let text = read_checked(path, 0o022, "writable by its owner only (0600 or 0644)")?;
        let file: RingFile = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(bad(path, format!("unknown version {}", file.version)));
        }
        if file.keys.is_empty() {
            return Err(bad(path, "the ring holds no key".into()));
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        for k in file.keys {
            if k.algorithm != "ed25519" {
                return Err(bad(
                    path,
                    format!("unsupported algorithm {:?}", k.algorithm),
                ));
            }
            let public = PublicKey::from_bytes_hex(&k.public_key, Algorithm::Ed25519)
                .map_err(|e| bad(path, format!("key {:#010x}: {e}", k.key_id)))?;
            if key_id(&public) != k.key_id {
                return Err(bad(
                    path,
                    format!("key id {:#010x} does not match its public key", k.key_id),
                ));
            }
            keys.push((k, public));
        }
        Ok(KeyRing {
            keys,
            max_token_ttl: file.max_token_ttl,
        })
    }

    fn to_file(&self) -> RingFile {
        RingFile {
            version: FORMAT_VERSION,
            max_token_ttl: self.max_token_ttl,
            keys: self.keys.iter().map(|(k, _)| k.clone()).collect(),
        }
    }

    /// The longest lifetime of a token, in seconds.
    pub fn max_token_ttl(&self) -> u64 {
        self.max_token_ttl
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &TrustedKey> {
        self.keys.iter().map(|(k, _)| k)
    }

    /// The public key for a token's root key id, if it is trusted at `now`.
    pub fn choose(&self, key_id: Option<u32>, now: u64) -> Result<PublicKey, RingMiss> {
        let id = key_id.ok_or(RingMiss::NoKeyId)?;
        let (entry, public) = self
            .keys
            .iter()
            .find(|(k, _)| k.key_id == id)
            .ok_or(RingMiss::Unknown(id))?;
        match entry.trusted_until {
            Some(until) if now >= until => Err(RingMiss::Retired(id)),
            _ => Ok(*public),
        }
    }
}

/// A ring file that is read again when it changes on disk (after a rotation
/// by another process), checked at most once per `recheck` and whenever a
/// token names a key id the cached ring does not know.
#[derive(Debug)]
pub struct RingSource {
    path: Option<PathBuf>,
    state: Mutex<RingState>,
    recheck: Duration,
}

#[derive(Debug)]
struct RingState {
    ring: Arc<KeyRing>,
    stamp: Option<(i64, i64, u64, u64)>,
    checked: Instant,
}

fn stamp(path: &Path) -> Option<(i64, i64, u64, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.ino(), m.len()))
}

impl RingSource {
    /// A fixed ring (no file).
    pub fn fixed(ring: KeyRing) -> RingSource {
        RingSource {
            path: None,
            state: Mutex::new(RingState {
                ring: Arc::new(ring),
                stamp: None,
                checked: Instant::now(),
            }),
            recheck: Duration::from_secs(1),
        }
    }

    /// The ring in `path`, reloaded when the file changes.
    pub fn watch(path: &Path) -> Result<RingSource, KeyError> {
        let ring = KeyRing::load(path)?;
        Ok(RingSource {
            path: Some(path.to_path_buf()),
            state: Mutex::new(RingState {
                ring: Arc::new(ring),
                stamp: stamp(path),
                checked: Instant::now(),
            }),
            recheck: Duration::from_secs(1),
        })
    }

    /// The current ring; with `force`, the file is checked now.
    pub fn current(&self, force: bool) -> Arc<KeyRing> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.path {
            if force || st.checked.elapsed() >= self.recheck {
                st.checked = Instant::now();
                let now = stamp(path);
                if now != st.stamp {
                    match KeyRing::load(path) {
                        Ok(ring) => {
                            tracing::info!(path = %path.display(), "reloaded the key ring");
                            st.ring = Arc::new(ring);
                            st.stamp = now;
                        }
                        // Keep the last good ring; a half-written or broken file
                        // must not lock everyone out.
                        Err(e) => tracing::warn!(error = %e, "cannot reload the key ring"),
                    }
                }
            }
        }
        st.ring.clone()
    }
}

/// The signing key and the ring, in a data dir.
pub struct KeyStore {
    dir: PathBuf,
    signing: KeyPair,
    signing_id: u32,
    ring: KeyRing,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("dir", &self.dir)
            .field("signing_id", &format_args!("{:#010x}", self.signing_id))
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// The keys folder of a data dir.
    pub fn keys_dir(data_dir: &Path) -> PathBuf {
        data_dir.join("keys")
    }

    /// The ring file of a data dir.
    pub fn ring_path(data_dir: &Path) -> PathBuf {
        Self::keys_dir(data_dir).join(RING_FILE)
    }

    /// The signing key file of a data dir.
    pub fn key_path(data_dir: &Path) -> PathBuf {
        Self::keys_dir(data_dir).join(KEY_FILE)
    }

    /// Opens the keys of `data_dir`, creating a signing key and a ring with
    /// [`DEFAULT_MAX_TOKEN_TTL`] on first use.
    pub fn open(data_dir: &Path) -> Result<KeyStore, KeyError> {
        Self::open_with(data_dir, DEFAULT_MAX_TOKEN_TTL, unix_now())
    }

    /// Opens the keys of `data_dir`; on first use, creates them with
    /// `max_token_ttl` (ignored when the ring exists: the ring's value counts).
    pub fn open_with(data_dir: &Path, max_token_ttl: u64, now: u64) -> Result<KeyStore, KeyError> {
        let dir = Self::keys_dir(data_dir);
        let key_path = dir.join(KEY_FILE);
        let ring_path = dir.join(RING_FILE);
        if !key_path.exists() && !ring_path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| KeyError::Io {
                    path: dir.clone(),
                    source,
                })?;
            let keypair = KeyPair::new();
            let id = key_id(&keypair.public());
            let ring = KeyRing {
                keys: vec![(trusted(&keypair, id, now), keypair.public())],
                max_token_ttl,
            };
            write_ring(&ring_path, &ring)?;
            write_key(&key_path, &keypair, id, now)?;
            tracing::info!(key_id = format_args!("{id:#010x}"), dir = %dir.display(), "created the root key");
        }
        let (signing, signing_id) = read_key(&key_path)?;
        let ring = KeyRing::load(&ring_path)?;
        if ring.choose(Some(signing_id), now).is_err() {
            return Err(KeyError::SigningKeyNotTrusted {
                key_id: signing_id,
                path: ring_path,
            });
        }
        Ok(KeyStore {
            dir,
            signing,
            signing_id,
            ring,
        })
    }

    /// Makes a new signing key. The old key is retired: tokens it signed keep
    /// verifying until `now + max_token_ttl`, by which time every one of them
    /// has expired. Keys whose grace has ended are dropped from the ring.
    /// Returns the new key id.
    pub fn rotate(&mut self, now: u64) -> Result<u32, KeyError> {
        let keypair = KeyPair::new();
        let id = key_id(&keypair.public());
        let mut ring = self.ring.clone();
        ring.keys
            .retain(|(k, _)| k.trusted_until.is_none_or(|until| until > now));
        for (k, _) in &mut ring.keys {
            if k.retired_at.is_none() {
                k.retired_at = Some(now);
                k.trusted_until = Some(now.saturating_add(ring.max_token_ttl));
            }
        }
        ring.keys
            .push((trusted(&keypair, id, now), keypair.public()));
        // The ring first: a crash between the two writes leaves the old key
        // signing and both keys trusted, which is safe.
        write_ring(&self.dir.join(RING_FILE), &ring)?;
        write_key(&self.dir.join(KEY_FILE), &keypair, id, now)?;
        self.ring = ring;
        self.signing = keypair;
        self.signing_id = id;
        Ok(id)
    }

    /// The current signing key's id.
    pub fn signing_key_id(&self) -> u32 {
        self.signing_id
    }

    /// The ring as loaded or last rotated.
    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    /// A minter with the current signing key.
    pub fn minter(&self) -> super::Minter {
        super::Minter::new(
            KeyPair::from(&self.signing.private()),
            self.ring.max_token_ttl,
        )
    }
}

fn trusted(keypair: &KeyPair, id: u32, now: u64) -> TrustedKey {
    TrustedKey {
        key_id: id,
        algorithm: "ed25519".into(),
        public_key: keypair.public().to_bytes_hex(),
        created_at: now,
        retired_at: None,
        trusted_until: None,
    }
}

fn bad(path: &Path, reason: String) -> KeyError {
    KeyError::BadContent {
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads a key file after checking that it is a regular file and that none
/// of `forbidden` mode bits are set.
fn read_checked(path: &Path, forbidden: u32, want: &'static str) -> Result<String, KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & forbidden != 0 {
        return Err(KeyError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
            want,
        });
    }
    fs::read_to_string(path).map_err(io_err)
}

fn read_key(path: &Path) -> Result<(KeyPair, u32), KeyError> {
    let text = read_checked(path, 0o077, "readable by its owner only (0600)")?;
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
    if file.version != FORMAT_VERSION {
        return Err(bad(path, format!("unknown version {}", file.version)));
    }
    if file.algorithm != "ed25519" {
        return Err(bad(
            path,
            format!("unsupported algorithm {:?}", file.algorithm),
        ));
    }
    let private = PrivateKey::from_bytes_hex(&file.private_key, Algorithm::Ed25519)
        .map_err(|e| bad(path, format!("private key: {e}")))?;
    let keypair = KeyPair::from(&private);
    let id = key_id(&keypair.public());
    if id != file.key_id {
        return Err(bad(
            path,
            format!("key id {:#010x} does not match the key", file.key_id),
        ));
    }
    Ok((keypair, id))
}

fn write_key(path: &Path, keypair: &KeyPair, id: u32, now: u64) -> Result<(), KeyError> {
    let file = KeyFile {
        version: FORMAT_VERSION,
        key_id: id,
        algorithm: "ed25519".into(),
        private_key: keypair.private().to_bytes_hex(),
        created_at: now,
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| bad(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

fn write_ring(path: &Path, ring: &KeyRing) -> Result<(), KeyError> {
    let text =
        serde_json::to_string_pretty(&ring.to_file()).map_err(|e| bad(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Writes `bytes` to a 0600 temporary file beside `path`, syncs it, and
/// renames it over `path`, then syncs the folder.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err)?;
    f.write_all(bytes).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    cell0_proto::host::unix_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_on_first_use_with_owner_only_modes() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        let key = KeyStore::key_path(dir.path());
        let ring = KeyStore::ring_path(dir.path());
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&ring).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir_mode = fs::metadata(KeyStore::keys_dir(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // Opening again gives the same key.
        let again = KeyStore::open(dir.path()).unwrap();
        assert_eq!(again.signing_key_id(), ks.signing_key_id());
    }

    #[test]
    fn loose_permissions_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        KeyStore::open(dir.path()).unwrap();
        let key = KeyStore::key_path(dir.path());
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, KeyError::LoosePermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("root.key"), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let ring = KeyStore::ring_path(dir.path());
        fs::set_permissions(&ring, fs::Permissions::from_mode(0o666)).unwrap();
        let err = KeyStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::LoosePermissions { .. }), "{err}");
        // A world-readable ring is fine: it holds public keys only.
        fs::set_permissions(&ring, fs::Permissions::from_mode(0o644)).unwrap();
        KeyStore::open(dir.path()).unwrap();
    }

    #[test]
    fn bad_content_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        KeyStore::open(dir.path()).unwrap();
        let key = KeyStore::key_path(dir.path());
        fs::write(&key, "not json").unwrap();
        let err = KeyStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::BadContent { .. }), "{err}");
        let text =
            r#"{"version":1,"key_id":1,"algorithm":"ed25519","private_key":"zz","created_at":0}"#;
        fs::write(&key, text).unwrap();
        let err = KeyStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        // A symlink is not accepted as a key file.
        fs::remove_file(&key).unwrap();
        std::os::unix::fs::symlink("/dev/null", &key).unwrap();
        let err = KeyStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn rotation_retires_the_old_key_after_the_max_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let mut ks = KeyStore::open_with(dir.path(), 100, 1_000).unwrap();
        let old = ks.signing_key_id();
        let new = ks.rotate(2_000).unwrap();
        assert_ne!(old, new);
        let ring = KeyRing::load(&KeyStore::ring_path(dir.path())).unwrap();
        assert!(ring.choose(Some(old), 2_099).is_ok());
        assert_eq!(ring.choose(Some(old), 2_100), Err(RingMiss::Retired(old)));
        assert!(ring.choose(Some(new), 1_000_000).is_ok());
        assert_eq!(ring.choose(None, 2_000), Err(RingMiss::NoKeyId));
        assert_eq!(ring.choose(Some(7), 2_000), Err(RingMiss::Unknown(7)));
        // A second rotation after the grace drops the first key.
        ks.rotate(3_000).unwrap();
        let ids: Vec<u32> = ks.ring().entries().map(|k| k.key_id).collect();
        assert!(!ids.contains(&old));
        assert_eq!(ids.len(), 2);
        // Reopening picks up the newest key.
        let again = KeyStore::open(dir.path()).unwrap();
        assert_eq!(again.signing_key_id(), ks.signing_key_id());
    }
}
