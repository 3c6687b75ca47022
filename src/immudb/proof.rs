//! Pure, byte-exact immudb v1.11 hashing and proof verification (no I/O).
//!
//! Everything here follows `immudb-spec.md` §2. The types are plain Rust structs rather than the
//! prost-generated ones so that this module can be tested in isolation and so that every digest is
//! a fixed `[u8; 32]`: the conversion from protobuf (where digests are `bytes` of any length) must go
//! through [`digest_from_slice`], which rejects wrong lengths instead of silently padding them the
//! way the Go SDK does.
//!
//! Where the Go SDK is lenient this module is stricter (§2.10): a LinearAdvanceProof that is needed
//! but absent is a rejection (that is the "linear fake" attack, GHSA-672p-m5jq-mrh8), proof fields
//! that the dual proof does not use must be empty, and the AHT consistency check additionally
//! requires the RFC 9162 `sn == 0` end condition.

use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// A SHA-256 digest. immudb digests are always exactly 32 bytes.
pub type Digest = [u8; 32];

/// Leaf prefix of both Merkle trees (per-tx htree and the binary-linking AHT).
const LEAF_PREFIX: u8 = 0x00;
/// Interior node prefix of both Merkle trees.
const NODE_PREFIX: u8 = 0x01;

/// First byte of the stored key of a plain KV or a reference entry.
pub const SET_KEY_PREFIX: u8 = 0x00;
/// First byte of the stored key of a sorted-set (ZAdd) member.
pub const SORTED_SET_KEY_PREFIX: u8 = 0x01;
/// First byte of the stored value of a plain KV.
pub const PLAIN_VALUE_PREFIX: u8 = 0x00;
/// First byte of the stored value of a reference.
pub const REFERENCE_VALUE_PREFIX: u8 = 0x01;

/// Largest serialised tx metadata `extra` field the server accepts.
pub const MAX_TX_METADATA_EXTRA_LEN: usize = 256;

/// What can go wrong while verifying; one variant per check so a caller can say *what* failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error("{what}: digest must be 32 bytes, got {len}")]
    BadDigestLength { what: &'static str, len: usize },
    #[error("unsupported tx header version {0} (only 0 and 1 exist)")]
    UnsupportedVersion(i32),
    #[error("invalid KV metadata: {0}")]
    InvalidKvMetadata(String),
    #[error("invalid tx metadata: {0}")]
    InvalidTxMetadata(String),
    #[error("invalid entry: {0}")]
    InvalidEntry(String),
    #[error("tx header {id} fails sanity check: {reason}")]
    HeaderSanity { id: u64, reason: String },
    #[error("tx {tx}: header says {expected} entries, got {got}")]
    EntryCount { tx: u64, expected: i64, got: usize },
    #[error("tx {tx}: entries hash to an eH different from the header's")]
    EntriesHashMismatch { tx: u64 },
    #[error("no entry with stored key {key} in the transaction")]
    EntryNotFound { key: String },
    #[error("entry with stored key {key} differs from what was written")]
    EntryMismatch { key: String },
    #[error("htree inclusion proof (leaf {leaf}, width {width}) does not verify")]
    HtreeInclusion { leaf: i32, width: i32 },
    #[error("AHT inclusion proof of leaf {i} in tree of size {j} does not verify")]
    Inclusion { i: u64, j: u64 },
    #[error("AHT last-leaf inclusion proof for tree of size {i} does not verify")]
    LastInclusion { i: u64 },
    #[error("AHT consistency proof from size {i} to size {j} does not verify")]
    Consistency { i: u64, j: u64 },
    #[error("linear proof {source_tx} -> {target_tx} does not verify: {reason}")]
    Linear {
        source_tx: u64,
        target_tx: u64,
        reason: &'static str,
    },
    #[error("linear-advance proof over ({start}, {end}) is required but missing")]
    LinearAdvanceMissing { start: u64, end: u64 },
    #[error("linear-advance proof over ({start}, {end}) does not verify: {reason}")]
    LinearAdvance {
        start: u64,
        end: u64,
        reason: &'static str,
    },
    #[error("dual proof: {0}")]
    DualShape(String),
    #[error("dual proof: source header (tx {tx}) does not hash to the trusted source Alh")]
    SourceAlhMismatch { tx: u64 },
    #[error("dual proof: target header (tx {tx}) does not hash to the expected target Alh")]
    TargetAlhMismatch { tx: u64 },
    #[error("dual proof: field {field} must be empty here but carries {len} terms")]
    UnexpectedProof { field: &'static str, len: usize },
    #[error("invalid public key: {0}")]
    PublicKey(String),
    #[error("malformed state signature: {0}")]
    SignatureEncoding(String),
    #[error("state signature does not verify for db {db:?} at tx {tx_id}")]
    Signature { db: String, tx_id: u64 },
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// Converts protobuf `bytes` into a digest, rejecting anything that is not exactly 32 bytes.
pub fn digest_from_slice(what: &'static str, bytes: &[u8]) -> Result<Digest, VerifyError> {
    bytes.try_into().map_err(|_| VerifyError::BadDigestLength {
        what,
        len: bytes.len(),
    })
}

/// Converts a list of protobuf `bytes` (a proof's terms) into digests, rejecting wrong lengths.
pub fn digests_from_slices<B: AsRef<[u8]>>(
    what: &'static str,
    items: &[B],
) -> Result<Vec<Digest>, VerifyError> {
    items
        .iter()
        .map(|b| digest_from_slice(what, b.as_ref()))
        .collect()
}

/// `H(0x01 || left || right)`: interior node of both trees.
fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// `H(0x00 || digest)`: leaf of both trees.
fn leaf_hash(d: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(d);
    h.finalize().into()
}

// ------------------------------------------------------------------------------------------------
// §2.1 key/value encodings

/// Stored key of a plain KV or reference: `0x00 || key`.
pub fn plain_key(key: &[u8]) -> Vec<u8> {
    prefixed(SET_KEY_PREFIX, key)
}

/// Stored value of a plain KV: `0x00 || value`.
pub fn plain_value(value: &[u8]) -> Vec<u8> {
    prefixed(PLAIN_VALUE_PREFIX, value)
}

/// Stored value of a reference: `0x01 || u64(atTx) || 0x00 || referencedKey`.
pub fn reference_value(at_tx: u64, referenced_key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + referenced_key.len());
    v.push(REFERENCE_VALUE_PREFIX);
    v.extend_from_slice(&at_tx.to_be_bytes());
    v.push(SET_KEY_PREFIX);
    v.extend_from_slice(referenced_key);
    v
}

/// Stored key of a sorted-set member (its stored value is empty):
/// `0x01 || u64(len(set)) || set || u64(bits(score)) || u64(len(k2)) || k2 || u64(atTx)`,
/// `k2 = 0x00 || key`.
pub fn zadd_key(set: &[u8], score: f64, key: &[u8], at_tx: u64) -> Vec<u8> {
    let k2 = plain_key(key);
    let mut v = Vec::with_capacity(33 + set.len() + k2.len());
    v.push(SORTED_SET_KEY_PREFIX);
    v.extend_from_slice(&(set.len() as u64).to_be_bytes());
    v.extend_from_slice(set);
    v.extend_from_slice(&score.to_bits().to_be_bytes());
    v.extend_from_slice(&(k2.len() as u64).to_be_bytes());
    v.extend_from_slice(&k2);
    v.extend_from_slice(&at_tx.to_be_bytes());
    v
}

fn prefixed(prefix: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + data.len());
    v.push(prefix);
    v.extend_from_slice(data);
    v
}

// ------------------------------------------------------------------------------------------------
// §2.2 metadata

/// Per-entry metadata. An absent proto `KVMetadata` and one with all flags false are the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvMetadata {
    pub deleted: bool,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub non_indexable: bool,
}

const KVMD_DELETED: u8 = 0x00;
const KVMD_EXPIRES_AT: u8 = 0x01;
const KVMD_NON_INDEXABLE: u8 = 0x02;

impl KvMetadata {
    /// True when it serialises to nothing (the only metadata a v0 header can carry).
    pub fn is_empty(&self) -> bool {
        !self.deleted && self.expires_at.is_none() && !self.non_indexable
    }

    /// Serialisation used inside entry digests: attributes in fixed order, each only if set.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(11);
        if self.deleted {
            v.push(KVMD_DELETED);
        }
        if let Some(t) = self.expires_at {
            v.push(KVMD_EXPIRES_AT);
            v.extend_from_slice(&t.to_be_bytes());
        }
        if self.non_indexable {
            v.push(KVMD_NON_INDEXABLE);
        }
        v
    }

    /// Strict parser of [`KvMetadata::to_bytes`]: attributes must appear at most once, in order,
    /// so that each byte string has exactly one meaning.
    pub fn from_bytes(b: &[u8]) -> Result<Self, VerifyError> {
        let bad = |m: &str| VerifyError::InvalidKvMetadata(format!("{m} in {}", hex::encode(b)));
        let mut md = KvMetadata::default();
        let mut last: Option<u8> = None;
        let mut i = 0;
        while i < b.len() {
            let attr = b[i];
            if last.is_some_and(|l| attr <= l) {
                return Err(bad("attributes repeated or out of order"));
            }
            last = Some(attr);
            i += 1;
            match attr {
                KVMD_DELETED => md.deleted = true,
                KVMD_EXPIRES_AT => {
                    let raw: [u8; 8] = b
                        .get(i..i + 8)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| bad("truncated expiresAt"))?;
                    md.expires_at = Some(i64::from_be_bytes(raw));
                    i += 8;
                }
                KVMD_NON_INDEXABLE => md.non_indexable = true,
                _ => return Err(bad("unknown attribute")),
            }
        }
        Ok(md)
    }
}

/// Per-transaction metadata. Absent and empty are equivalent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxMetadata {
    pub truncated_tx_id: u64,
    pub extra: Vec<u8>,
}

impl TxMetadata {
    /// True when it serialises to nothing.
    pub fn is_empty(&self) -> bool {
        self.truncated_tx_id == 0 && self.extra.is_empty()
    }

    /// Serialisation used in the v1 header: `0x00 || u64(truncatedTxID)` if non-zero, then
    /// `0x01 || u16(len(extra)) || extra` if non-empty. Fails if `extra` is over the limit.
    pub fn to_bytes(&self) -> Result<Vec<u8>, VerifyError> {
        if self.extra.len() > MAX_TX_METADATA_EXTRA_LEN {
            return Err(VerifyError::InvalidTxMetadata(format!(
                "extra is {} bytes, limit {MAX_TX_METADATA_EXTRA_LEN}",
                self.extra.len()
            )));
        }
        let mut v = Vec::new();
        if self.truncated_tx_id != 0 {
            v.push(0x00);
            v.extend_from_slice(&self.truncated_tx_id.to_be_bytes());
        }
        if !self.extra.is_empty() {
            v.push(0x01);
            v.extend_from_slice(&(self.extra.len() as u16).to_be_bytes());
            v.extend_from_slice(&self.extra);
        }
        Ok(v)
    }
}

// ------------------------------------------------------------------------------------------------
// §2.3 entry digests

/// A raw transaction entry as returned by `TxById`/`VerifiableTxById` without an entries spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxEntry {
    /// Stored key, including its prefix byte.
    pub key: Vec<u8>,
    /// `H(stored value)`.
    pub h_value: Digest,
    /// Length of the stored value; not covered by any hash.
    pub v_len: i32,
    pub metadata: KvMetadata,
}

fn check_version(version: i32) -> Result<(), VerifyError> {
    match version {
        0 | 1 => Ok(()),
        v => Err(VerifyError::UnsupportedVersion(v)),
    }
}

/// The leaf digest from a stored key, its metadata and `H(stored value)`.
fn entry_digest(
    version: i32,
    stored_key: &[u8],
    md: &KvMetadata,
    h_value: &Digest,
) -> Result<Digest, VerifyError> {
    check_version(version)?;
    if stored_key.is_empty() {
        return Err(VerifyError::InvalidEntry("empty key".into()));
    }
    let mut h = Sha256::new();
    if version == 0 {
        if !md.is_empty() {
            return Err(VerifyError::InvalidKvMetadata(
                "metadata is not allowed with tx header version 0".into(),
            ));
        }
        h.update(stored_key);
    } else {
        let klen = u16::try_from(stored_key.len()).map_err(|_| {
            VerifyError::InvalidEntry(format!("key of {} bytes is too long", stored_key.len()))
        })?;
        let mdb = md.to_bytes();
        h.update((mdb.len() as u16).to_be_bytes());
        h.update(&mdb);
        h.update(klen.to_be_bytes());
        h.update(stored_key);
    }
    h.update(h_value);
    Ok(h.finalize().into())
}

/// Digest of an entry whose key and value you know ("EntrySpec digest"). `stored_key` and
/// `stored_value` include their prefix bytes (see [`plain_key`], [`plain_value`], ...);
/// `version` is the tx header version.
pub fn entry_spec_digest(
    version: i32,
    stored_key: &[u8],
    md: &KvMetadata,
    stored_value: &[u8],
) -> Result<Digest, VerifyError> {
    entry_digest(version, stored_key, md, &sha256(stored_value))
}

/// Digest of a raw [`TxEntry`] (same formula with `hValue` in place of `H(stored value)`).
pub fn tx_entry_digest(version: i32, entry: &TxEntry) -> Result<Digest, VerifyError> {
    if entry.v_len < 0 {
        return Err(VerifyError::InvalidEntry(format!(
            "negative vLen {}",
            entry.v_len
        )));
    }
    entry_digest(version, &entry.key, &entry.metadata, &entry.h_value)
}

// ------------------------------------------------------------------------------------------------
// §2.4 per-transaction Merkle tree

/// Root (`eH`) of the per-tx tree over entry digests: neighbours paired left to right, an odd
/// last node carried up unchanged. Zero leaves give `H("")`, which no valid header has.
pub fn htree_root(leaves: &[Digest]) -> Digest {
    if leaves.is_empty() {
        return sha256(b"");
    }
    let mut level: Vec<Digest> = leaves.iter().map(leaf_hash).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    node_hash(&p[0], &p[1])
                } else {
                    p[0]
                }
            })
            .collect();
    }
    level[0]
}

/// The inclusion proof the server would send for leaf `index` of the per-tx tree (bottom-up
/// sibling hashes). `None` if `index` is out of range. Lets a client rebuild a proof from the raw
/// entries instead of trusting the server's.
pub fn htree_inclusion_proof(leaves: &[Digest], index: usize) -> Option<InclusionProof> {
    if index >= leaves.len() {
        return None;
    }
    let width = i32::try_from(leaves.len()).ok()?;
    let mut level: Vec<Digest> = leaves.iter().map(leaf_hash).collect();
    let mut i = index;
    let mut terms = Vec::new();
    while level.len() > 1 {
        let sibling = i ^ 1;
        if sibling < level.len() {
            terms.push(level[sibling]);
        }
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    node_hash(&p[0], &p[1])
                } else {
                    p[0]
                }
            })
            .collect();
        i /= 2;
    }
    Some(InclusionProof {
        leaf: index as i32,
        width,
        terms,
    })
}

/// An inclusion proof in the per-tx tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InclusionProof {
    pub leaf: i32,
    pub width: i32,
    pub terms: Vec<Digest>,
}

/// Checks that `entry_digest` is leaf `proof.leaf` of a tree of `proof.width` leaves with root
/// `root` (the header's `eH`).
pub fn verify_htree_inclusion(
    proof: &InclusionProof,
    entry_digest: &Digest,
    root: &Digest,
) -> Result<(), VerifyError> {
    let err = VerifyError::HtreeInclusion {
        leaf: proof.leaf,
        width: proof.width,
    };
    if proof.leaf < 0 || proof.width < 1 || proof.leaf >= proof.width {
        return Err(err);
    }
    let mut c = leaf_hash(entry_digest);
    let mut i = proof.leaf as u32;
    let mut r = (proof.width - 1) as u32;
    for t in &proof.terms {
        c = if i % 2 == 0 && i != r {
            node_hash(&c, t)
        } else {
            node_hash(t, &c)
        };
        i /= 2;
        r /= 2;
    }
    if i == r && &c == root {
        Ok(())
    } else {
        Err(err)
    }
}

// ------------------------------------------------------------------------------------------------
// §2.5 headers

/// A transaction header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxHeader {
    pub id: u64,
    pub prev_alh: Digest,
    pub ts: i64,
    pub version: i32,
    pub nentries: i32,
    pub eh: Digest,
    pub bl_tx_id: u64,
    pub bl_root: Digest,
    pub metadata: TxMetadata,
}

impl TxHeader {
    /// `H(u64(ts) || u16(version) || V || eH || u64(blTxId) || blRoot)` with `V` depending on the
    /// version. Fails for unknown versions and for fields that cannot be serialised in it.
    pub fn inner_hash(&self) -> Result<Digest, VerifyError> {
        check_version(self.version)?;
        let mut h = Sha256::new();
        h.update(self.ts.to_be_bytes());
        h.update((self.version as u16).to_be_bytes());
        if self.version == 0 {
            if !self.metadata.is_empty() {
                return Err(self.sanity("tx metadata is not allowed with version 0"));
            }
            let n = u16::try_from(self.nentries)
                .map_err(|_| self.sanity("nentries does not fit version 0"))?;
            h.update(n.to_be_bytes());
        } else {
            let md = self.metadata.to_bytes()?;
            let n = u32::try_from(self.nentries).map_err(|_| self.sanity("negative nentries"))?;
            h.update((md.len() as u16).to_be_bytes());
            h.update(&md);
            h.update(n.to_be_bytes());
        }
        h.update(self.eh);
        h.update(self.bl_tx_id.to_be_bytes());
        h.update(self.bl_root);
        Ok(h.finalize().into())
    }

    /// The accumulated linear hash `H(u64(id) || prevAlh || innerHash)`; `(id, alh)` is the
    /// database state at this transaction.
    pub fn alh(&self) -> Result<Digest, VerifyError> {
        Ok(linear_step(self.id, &self.prev_alh, &self.inner_hash()?))
    }

    /// The sanity checks of §2.5 for any header received from a server: `id ≥ 1`,
    /// `nentries ≥ 1`, `blTxId < id`, `blRoot` zero when `blTxId == 0`, known version, metadata
    /// within limits (and absent for version 0).
    pub fn check(&self) -> Result<(), VerifyError> {
        check_version(self.version)?;
        if self.id == 0 {
            return Err(self.sanity("id must be at least 1"));
        }
        if self.nentries < 1 {
            return Err(self.sanity("nentries must be at least 1"));
        }
        if self.bl_tx_id >= self.id {
            return Err(self.sanity("blTxId must be lower than id"));
        }
        if self.bl_tx_id == 0 && self.bl_root != [0u8; 32] {
            return Err(self.sanity("blRoot must be zero when blTxId is 0"));
        }
        // Serialisability (version-0 limits, metadata size) is checked by inner_hash.
        self.inner_hash().map(|_| ())
    }

    fn sanity(&self, reason: &str) -> VerifyError {
        VerifyError::HeaderSanity {
            id: self.id,
            reason: reason.to_string(),
        }
    }
}

/// One step of the linear hash chain: `H(u64(id) || prevAlh || innerHash)`.
fn linear_step(id: u64, prev_alh: &Digest, inner: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update(id.to_be_bytes());
    h.update(prev_alh);
    h.update(inner);
    h.finalize().into()
}

/// Verifies a whole returned transaction: header sanity, `nentries == len(entries)`, every entry
/// well-formed, and the tree over all raw entry digests equal to the header's `eH`. Returns the
/// entry digests (in order) so the caller can look up the entries it expects with
/// [`entry_spec_digest`] or build an inclusion proof with [`htree_inclusion_proof`].
pub fn verify_tx_entries(
    header: &TxHeader,
    entries: &[TxEntry],
) -> Result<Vec<Digest>, VerifyError> {
    header.check()?;
    if usize::try_from(header.nentries).ok() != Some(entries.len()) {
        return Err(VerifyError::EntryCount {
            tx: header.id,
            expected: header.nentries.into(),
            got: entries.len(),
        });
    }
    let digests = entries
        .iter()
        .map(|e| tx_entry_digest(header.version, e))
        .collect::<Result<Vec<_>, _>>()?;
    if htree_root(&digests) != header.eh {
        return Err(VerifyError::EntriesHashMismatch { tx: header.id });
    }
    Ok(digests)
}

/// Finds the entry with `stored_key` among a transaction's raw entries (whose digests come from
/// [`verify_tx_entries`]) and checks that it is exactly the expected key, metadata and value.
/// Returns its index (its leaf position in the tx tree). Matching is by key, because the order of
/// entries inside an ExecAll transaction is not guaranteed to be the request order.
pub fn expect_entry(
    version: i32,
    entries: &[TxEntry],
    digests: &[Digest],
    stored_key: &[u8],
    md: &KvMetadata,
    stored_value: &[u8],
) -> Result<usize, VerifyError> {
    let idx = entries
        .iter()
        .position(|e| e.key == stored_key)
        .ok_or_else(|| VerifyError::EntryNotFound {
            key: hex::encode(stored_key),
        })?;
    let want = entry_spec_digest(version, stored_key, md, stored_value)?;
    let len_ok = usize::try_from(entries[idx].v_len).ok() == Some(stored_value.len());
    if digests.get(idx) != Some(&want) || !len_ok {
        return Err(VerifyError::EntryMismatch {
            key: hex::encode(stored_key),
        });
    }
    Ok(idx)
}

// ------------------------------------------------------------------------------------------------
// §2.6 binary-linking tree (AHT)

/// The AHT leaf of a transaction: `H(0x00 || alh)`.
pub fn leaf_for(alh: &Digest) -> Digest {
    leaf_hash(alh)
}

/// AHT inclusion of `leaf` (already `leaf_for`-hashed) as 1-based leaf `i` of the tree of size
/// `j` with root `root`.
pub fn verify_inclusion(
    proof: &[Digest],
    i: u64,
    j: u64,
    leaf: &Digest,
    root: &Digest,
) -> Result<(), VerifyError> {
    let err = VerifyError::Inclusion { i, j };
    if i == 0 || i > j || (i < j && proof.is_empty()) {
        return Err(err);
    }
    let mut c = *leaf;
    let (mut a, mut b) = (i - 1, j - 1);
    for h in proof {
        c = if a % 2 == 0 && a != b {
            node_hash(&c, h)
        } else {
            node_hash(h, &c)
        };
        a >>= 1;
        b >>= 1;
    }
    // Honest paths always end on the root's own column (a == b); anything else is a path for a
    // different position that happens to be fed the same number of terms.
    if a == b && &c == root {
        Ok(())
    } else {
        Err(err)
    }
}

/// AHT inclusion of `leaf` as the last leaf of the tree of size `i`.
pub fn verify_last_inclusion(
    proof: &[Digest],
    i: u64,
    leaf: &Digest,
    root: &Digest,
) -> Result<(), VerifyError> {
    if i == 0 {
        return Err(VerifyError::LastInclusion { i });
    }
    let c = proof.iter().fold(*leaf, |c, h| node_hash(h, &c));
    if &c == root {
        Ok(())
    } else {
        Err(VerifyError::LastInclusion { i })
    }
}

/// AHT consistency between the tree of size `i` (root `ri`) and size `j` (root `rj`), with the
/// RFC 9162 hardening for `i < j` that the walk must not go past the top and must end there
/// (`sn == 0`); every honest proof satisfies it (checked for all `i < j ≤ 70` in the tests).
pub fn verify_consistency(
    proof: &[Digest],
    i: u64,
    j: u64,
    ri: &Digest,
    rj: &Digest,
) -> Result<(), VerifyError> {
    let err = VerifyError::Consistency { i, j };
    if i == 0 || i > j || (i < j && proof.is_empty()) {
        return Err(err);
    }
    if proof.is_empty() {
        // i == j: nothing to prove beyond equality of the roots.
        return if ri == rj { Ok(()) } else { Err(err) };
    }
    let (mut fn_, mut sn) = (i - 1, j - 1);
    while fn_ % 2 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut ci, mut cj) = (proof[0], proof[0]);
    for h in &proof[1..] {
        if sn == 0 && i < j {
            // More terms than levels: not an honest proof. (For i == j the server's proof
            // legitimately carries one term past the top; the roots must be equal anyway.)
            return Err(err);
        }
        if fn_ % 2 == 1 || fn_ == sn {
            ci = node_hash(h, &ci);
            cj = node_hash(h, &cj);
            while fn_ % 2 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            cj = node_hash(&cj, h);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // RFC 9162 end condition for real extensions; for i == j the server's 2-term proof does not
    // walk to the top, and equality of the roots is what matters.
    let walked_to_top = if i < j { sn == 0 } else { ri == rj };
    if walked_to_top && &ci == ri && &cj == rj {
        Ok(())
    } else {
        Err(err)
    }
}

// ------------------------------------------------------------------------------------------------
// §2.7 linear proof, §2.8 linear-advance proof

/// Proves `Alh(target)` from `Alh(source)` through the inner hashes of the txs in between.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinearProof {
    pub source_tx_id: u64,
    pub target_tx_id: u64,
    pub terms: Vec<Digest>,
}

/// Verifies that `proof` links (`source_tx`, `source_alh`) to (`target_tx`, `target_alh`).
pub fn verify_linear(
    proof: &LinearProof,
    source_tx: u64,
    target_tx: u64,
    source_alh: &Digest,
    target_alh: &Digest,
) -> Result<(), VerifyError> {
    let fail = |reason| VerifyError::Linear {
        source_tx,
        target_tx,
        reason,
    };
    if proof.source_tx_id != source_tx || proof.target_tx_id != target_tx {
        return Err(fail("proof is for other transactions"));
    }
    if source_tx == 0 || source_tx > target_tx {
        return Err(fail("source must be in 1..=target"));
    }
    if proof.terms.len() as u64 != target_tx - source_tx + 1 {
        return Err(fail("wrong number of terms"));
    }
    if &proof.terms[0] != source_alh {
        return Err(fail("first term is not the source Alh"));
    }
    let mut a = proof.terms[0];
    for (k, inner) in proof.terms.iter().enumerate().skip(1) {
        a = linear_step(source_tx + k as u64, &a, inner);
    }
    if &a == target_alh {
        Ok(())
    } else {
        Err(fail("chain does not end at the target Alh"))
    }
}

/// Proves that the part of an old linear chain that a newer AHT has absorbed really consists of
/// leaves of that AHT (the fix for the linear-fake attack).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinearAdvanceProof {
    pub linear_proof_terms: Vec<Digest>,
    /// One AHT inclusion proof (terms only) per intermediate tx.
    pub inclusion_proofs: Vec<Vec<Digest>>,
}

/// Verifies the linear chain from tx `start` (exclusive) to `end` (whose Alh is `end_alh`), every
/// intermediate Alh being a leaf of the AHT of size `tree_size` with root `tree_root`. A proof is
/// only needed when `end > start + 1`; then a missing proof is a rejection.
pub fn verify_linear_advance(
    proof: Option<&LinearAdvanceProof>,
    start: u64,
    end: u64,
    end_alh: &Digest,
    tree_root: &Digest,
    tree_size: u64,
) -> Result<(), VerifyError> {
    let fail = |reason| VerifyError::LinearAdvance { start, end, reason };
    if end < start {
        return Err(fail("end before start"));
    }
    if end <= start + 1 {
        // Nothing was absorbed; an honest server sends no proof. Extra data is refused so that
        // nothing unverified is ever carried along.
        return match proof {
            Some(p) if !p.linear_proof_terms.is_empty() || !p.inclusion_proofs.is_empty() => {
                Err(fail("proof present where none is needed"))
            }
            _ => Ok(()),
        };
    }
    let p = proof.ok_or(VerifyError::LinearAdvanceMissing { start, end })?;
    let n = end - start;
    if p.linear_proof_terms.len() as u64 != n {
        return Err(fail("wrong number of linear terms"));
    }
    if p.inclusion_proofs.len() as u64 != n - 1 {
        return Err(fail("wrong number of inclusion proofs"));
    }
    let mut a = p.linear_proof_terms[0];
    for tx in start + 1..end {
        let k = (tx - start) as usize;
        verify_inclusion(
            &p.inclusion_proofs[k - 1],
            tx,
            tree_size,
            &leaf_for(&a),
            tree_root,
        )
        .map_err(|_| fail("an intermediate Alh is not in the target tree"))?;
        a = linear_step(tx + 1, &a, &p.linear_proof_terms[k]);
    }
    if &a == end_alh {
        Ok(())
    } else {
        Err(fail("chain does not end at the expected Alh"))
    }
}

// ------------------------------------------------------------------------------------------------
// §2.9 dual proof

/// Everything needed to prove that the state at the target tx extends the state at the source tx.
///
/// `target_bl_tx_alh` is unused when `target_tx_header.bl_tx_id == 0` (the server then sends an
/// empty field; convert that to `[0; 32]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DualProof {
    pub source_tx_header: TxHeader,
    pub target_tx_header: TxHeader,
    pub inclusion_proof: Vec<Digest>,
    pub consistency_proof: Vec<Digest>,
    pub target_bl_tx_alh: Digest,
    pub last_inclusion_proof: Vec<Digest>,
    pub linear_proof: Option<LinearProof>,
    pub linear_advance_proof: Option<LinearAdvanceProof>,
}

fn require_empty(field: &'static str, terms: &[Digest]) -> Result<(), VerifyError> {
    if terms.is_empty() {
        Ok(())
    } else {
        Err(VerifyError::UnexpectedProof {
            field,
            len: terms.len(),
        })
    }
}

/// Verifies that the state (`target_tx`, `target_alh`) extends the trusted state (`source_tx`,
/// `source_alh`). The error says which step failed.
pub fn verify_dual(
    proof: &DualProof,
    source_tx: u64,
    target_tx: u64,
    source_alh: &Digest,
    target_alh: &Digest,
) -> Result<(), VerifyError> {
    let src = &proof.source_tx_header;
    let tgt = &proof.target_tx_header;
    // 1. shape
    if source_tx == 0 || source_tx > target_tx {
        return Err(VerifyError::DualShape(format!(
            "source tx {source_tx} must be in 1..={target_tx}"
        )));
    }
    if src.id != source_tx || tgt.id != target_tx {
        return Err(VerifyError::DualShape(format!(
            "headers are for txs {} -> {}, expected {source_tx} -> {target_tx}",
            src.id, tgt.id
        )));
    }
    src.check()?;
    tgt.check()?;
    // 2. the headers are the states being linked
    if &src.alh()? != source_alh {
        return Err(VerifyError::SourceAlhMismatch { tx: source_tx });
    }
    if &tgt.alh()? != target_alh {
        return Err(VerifyError::TargetAlhMismatch { tx: target_tx });
    }
    let (sb, tb) = (src.bl_tx_id, tgt.bl_tx_id);
    if sb > tb {
        return Err(VerifyError::DualShape(format!(
            "source blTxId {sb} is beyond target blTxId {tb}"
        )));
    }
    // 3. the source is a leaf of the target's AHT
    if source_tx < tb {
        verify_inclusion(
            &proof.inclusion_proof,
            source_tx,
            tb,
            &leaf_for(source_alh),
            &tgt.bl_root,
        )?;
    } else {
        require_empty("inclusionProof", &proof.inclusion_proof)?;
    }
    // 4. the target's AHT extends the source's
    if sb > 0 {
        verify_consistency(&proof.consistency_proof, sb, tb, &src.bl_root, &tgt.bl_root)?;
    } else {
        require_empty("consistencyProof", &proof.consistency_proof)?;
    }
    // 5. targetBlTxAlh is the last leaf of the target's AHT
    if tb > 0 {
        verify_last_inclusion(
            &proof.last_inclusion_proof,
            tb,
            &leaf_for(&proof.target_bl_tx_alh),
            &tgt.bl_root,
        )?;
    } else {
        require_empty("lastInclusionProof", &proof.last_inclusion_proof)?;
    }
    // 6. the linear parts
    let linear = proof.linear_proof.as_ref().ok_or(VerifyError::Linear {
        source_tx,
        target_tx,
        reason: "linear proof missing",
    })?;
    let la = proof.linear_advance_proof.as_ref();
    if source_tx < tb {
        verify_linear(linear, tb, target_tx, &proof.target_bl_tx_alh, target_alh)?;
        verify_linear_advance(la, sb, source_tx, source_alh, &tgt.bl_root, tb)?;
    } else {
        verify_linear(linear, source_tx, target_tx, source_alh, target_alh)?;
        verify_linear_advance(la, sb, tb, &proof.target_bl_tx_alh, &tgt.bl_root, tb)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// §2.11 state signatures

/// The bytes the server signs: `u32(len(db)) || db || u64(txId) || txHash`. `db` must be the
/// name as the server reports it (lower case).
pub fn signed_state_payload(db: &str, tx_id: u64, tx_hash: &Digest) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + db.len() + 8 + 32);
    v.extend_from_slice(&(db.len() as u32).to_be_bytes());
    v.extend_from_slice(db.as_bytes());
    v.extend_from_slice(&tx_id.to_be_bytes());
    v.extend_from_slice(tx_hash);
    v
}

/// Loads the server's public key from a PKIX "PUBLIC KEY" PEM (what `openssl ec -pubout` writes).
/// This, not the key embedded in responses, is what signatures must be checked against.
pub fn parse_public_key_pem(pem: &str) -> Result<p256::ecdsa::VerifyingKey, VerifyError> {
    use p256::pkcs8::DecodePublicKey;
    p256::ecdsa::VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| VerifyError::PublicKey(e.to_string()))
}

/// Loads a public key from SEC1 point bytes (e.g. `04 || X || Y`).
pub fn parse_public_key_sec1(bytes: &[u8]) -> Result<p256::ecdsa::VerifyingKey, VerifyError> {
    p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
        .map_err(|e| VerifyError::PublicKey(e.to_string()))
}

/// Checks a DER-encoded ECDSA P-256 signature over SHA-256 of the state payload. High-S
/// signatures are accepted because the Go server does not normalise them.
pub fn verify_state_signature(
    key: &p256::ecdsa::VerifyingKey,
    db: &str,
    tx_id: u64,
    tx_hash: &Digest,
    signature_der: &[u8],
) -> Result<(), VerifyError> {
    use p256::ecdsa::signature::Verifier;
    let sig = p256::ecdsa::Signature::from_der(signature_der)
        .map_err(|e| VerifyError::SignatureEncoding(e.to_string()))?;
    key.verify(&signed_state_payload(db, tx_id, tx_hash), &sig)
        .map_err(|_| VerifyError::Signature {
            db: db.to_string(),
            tx_id,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        sha256(&[n])
    }

    /// Reference root by the RFC 6962 recursive definition (split at the largest power of two
    /// below n), to cross-check the level-by-level construction.
    fn rfc_root(leaves: &[Digest]) -> Digest {
        if leaves.len() == 1 {
            return leaf_hash(&leaves[0]);
        }
        let k = leaves.len().next_power_of_two() / 2;
        node_hash(&rfc_root(&leaves[..k]), &rfc_root(&leaves[k..]))
    }

    #[test]
    fn htree_matches_rfc_shape_and_proofs_verify_for_all_widths() {
        for n in 1..=40u8 {
            let leaves: Vec<Digest> = (0..n).map(d).collect();
            let root = htree_root(&leaves);
            assert_eq!(root, rfc_root(&leaves), "width {n}");
            for i in 0..n as usize {
                let p = htree_inclusion_proof(&leaves, i).unwrap();
                verify_htree_inclusion(&p, &leaves[i], &root).unwrap();
                // the proof is bound to its position and its leaf
                let other = (i + 1) % n as usize;
                if other != i {
                    assert!(verify_htree_inclusion(&p, &leaves[other], &root).is_err());
                    let mut moved = p.clone();
                    moved.leaf = other as i32;
                    assert!(verify_htree_inclusion(&moved, &leaves[i], &root).is_err());
                }
            }
            assert!(htree_inclusion_proof(&leaves, n as usize).is_none());
        }
    }

    #[test]
    fn htree_width_one_needs_no_terms_and_rejects_bad_shapes() {
        let leaf = d(7);
        let root = htree_root(&[leaf]);
        assert_eq!(root, leaf_hash(&leaf));
        let p = InclusionProof {
            leaf: 0,
            width: 1,
            terms: vec![],
        };
        verify_htree_inclusion(&p, &leaf, &root).unwrap();
        for (leaf_i, width) in [(1, 1), (-1, 1), (0, 0), (0, -3)] {
            let bad = InclusionProof {
                leaf: leaf_i,
                width,
                terms: vec![],
            };
            assert!(verify_htree_inclusion(&bad, &leaf, &root).is_err());
        }
        // an extra term changes the root
        let extra = InclusionProof {
            leaf: 0,
            width: 1,
            terms: vec![d(1)],
        };
        assert!(verify_htree_inclusion(&extra, &leaf, &root).is_err());
        assert_eq!(htree_root(&[]), sha256(b""));
    }

    /// Minimal AHT over Alhs for the unit tests: RFC 6962 paths.
    fn aht_root(leaves: &[Digest]) -> Digest {
        let hashed: Vec<Digest> = leaves.iter().map(leaf_for).collect();
        fn mth(n: &[Digest]) -> Digest {
            if n.len() == 1 {
                return n[0];
            }
            let k = n.len().next_power_of_two() / 2;
            node_hash(&mth(&n[..k]), &mth(&n[k..]))
        }
        mth(&hashed)
    }

    #[test]
    fn aht_edge_cases() {
        let alhs: Vec<Digest> = (0..8).map(d).collect();
        let r1 = aht_root(&alhs[..1]);
        // size 1: the root is the leaf, proofs are empty
        verify_inclusion(&[], 1, 1, &leaf_for(&alhs[0]), &r1).unwrap();
        verify_last_inclusion(&[], 1, &leaf_for(&alhs[0]), &r1).unwrap();
        verify_consistency(&[], 1, 1, &r1, &r1).unwrap();
        // i == 0, i > j, empty proof with i < j
        assert!(verify_inclusion(&[], 0, 1, &leaf_for(&alhs[0]), &r1).is_err());
        assert!(verify_inclusion(&[r1], 2, 1, &leaf_for(&alhs[0]), &r1).is_err());
        let r2 = aht_root(&alhs[..2]);
        assert!(verify_inclusion(&[], 1, 2, &leaf_for(&alhs[0]), &r2).is_err());
        assert!(verify_last_inclusion(&[], 0, &leaf_for(&alhs[0]), &r1).is_err());
        assert!(verify_consistency(&[], 0, 1, &r1, &r1).is_err());
        assert!(verify_consistency(&[], 1, 2, &r1, &r2).is_err());
        assert!(verify_consistency(&[r1], 2, 1, &r2, &r1).is_err());
        // i == j with empty proof needs equal roots
        assert!(verify_consistency(&[], 2, 2, &r1, &r2).is_err());
        // size 2: leaf 1 with sibling leaf 2
        verify_inclusion(&[leaf_for(&alhs[1])], 1, 2, &leaf_for(&alhs[0]), &r2).unwrap();
        verify_last_inclusion(&[leaf_for(&alhs[0])], 2, &leaf_for(&alhs[1]), &r2).unwrap();
        verify_consistency(&[r1, leaf_for(&alhs[1])], 1, 2, &r1, &r2).unwrap();
        // odd tree: size 3, last leaf proven by the root of the first two
        let r3 = aht_root(&alhs[..3]);
        verify_last_inclusion(&[r2], 3, &leaf_for(&alhs[2]), &r3).unwrap();
        verify_inclusion(&[r2], 3, 3, &leaf_for(&alhs[2]), &r3).unwrap();
        verify_consistency(&[r2, leaf_for(&alhs[2])], 2, 3, &r2, &r3).unwrap();
        // a swapped pair of terms fails
        assert!(verify_consistency(&[leaf_for(&alhs[2]), r2], 2, 3, &r2, &r3).is_err());
        // a trailing extra term fails the sn == 0 hardening even if the roots were forged to fit
        let extra = d(99);
        let forged_ri = node_hash(&extra, &r2);
        let forged_rj = node_hash(&extra, &r3);
        assert!(verify_consistency(
            &[r2, leaf_for(&alhs[2]), extra],
            2,
            3,
            &forged_ri,
            &forged_rj
        )
        .is_err());
    }

    fn header(id: u64, prev: Digest, bl_tx_id: u64, bl_root: Digest) -> TxHeader {
        TxHeader {
            id,
            prev_alh: prev,
            ts: 1_700_000_000 + id as i64,
            version: 1,
            nentries: 1,
            eh: htree_root(&[d(id as u8)]),
            bl_tx_id,
            bl_root,
            metadata: TxMetadata::default(),
        }
    }

    #[test]
    fn linear_proof_edges() {
        let h1 = header(1, sha256(b""), 0, [0; 32]);
        let a1 = h1.alh().unwrap();
        // i == j: a single term equal to the Alh
        let p = LinearProof {
            source_tx_id: 1,
            target_tx_id: 1,
            terms: vec![a1],
        };
        verify_linear(&p, 1, 1, &a1, &a1).unwrap();
        // empty terms
        let empty = LinearProof {
            source_tx_id: 1,
            target_tx_id: 1,
            terms: vec![],
        };
        assert!(verify_linear(&empty, 1, 1, &a1, &a1).is_err());
        // source 0
        let zero = LinearProof {
            source_tx_id: 0,
            target_tx_id: 1,
            terms: vec![a1, a1],
        };
        assert!(verify_linear(&zero, 0, 1, &a1, &a1).is_err());
        // two steps
        let h2 = header(2, a1, 1, aht_root(&[a1]));
        let a2 = h2.alh().unwrap();
        let p = LinearProof {
            source_tx_id: 1,
            target_tx_id: 2,
            terms: vec![a1, h2.inner_hash().unwrap()],
        };
        verify_linear(&p, 1, 2, &a1, &a2).unwrap();
        // ids of the proof must match what is being proven
        assert!(verify_linear(&p, 1, 2, &a1, &a1).is_err());
        let mut wrong_ids = p.clone();
        wrong_ids.target_tx_id = 3;
        assert!(verify_linear(&wrong_ids, 1, 2, &a1, &a2).is_err());
    }

    #[test]
    fn linear_advance_needed_only_when_txs_were_absorbed() {
        let r = d(1);
        let a = d(2);
        verify_linear_advance(None, 3, 3, &a, &r, 5).unwrap();
        verify_linear_advance(None, 3, 4, &a, &r, 5).unwrap();
        assert_eq!(
            verify_linear_advance(None, 3, 5, &a, &r, 5),
            Err(VerifyError::LinearAdvanceMissing { start: 3, end: 5 })
        );
        assert!(verify_linear_advance(None, 4, 3, &a, &r, 5).is_err());
        let junk = LinearAdvanceProof {
            linear_proof_terms: vec![a],
            inclusion_proofs: vec![],
        };
        assert!(verify_linear_advance(Some(&junk), 3, 4, &a, &r, 5).is_err());
        let empty = LinearAdvanceProof::default();
        verify_linear_advance(Some(&empty), 3, 4, &a, &r, 5).unwrap();
    }

    #[test]
    fn dual_proof_on_a_tiny_chain() {
        // tx1 (bl 0), tx2 (bl 1), tx3 (bl 2)
        let h1 = header(1, sha256(b""), 0, [0; 32]);
        let a1 = h1.alh().unwrap();
        let h2 = header(2, a1, 1, aht_root(&[a1]));
        let a2 = h2.alh().unwrap();
        let h3 = header(3, a2, 2, aht_root(&[a1, a2]));
        let a3 = h3.alh().unwrap();
        let proof = DualProof {
            source_tx_header: h1.clone(),
            target_tx_header: h3.clone(),
            inclusion_proof: vec![leaf_for(&a2)],
            consistency_proof: vec![],
            target_bl_tx_alh: a2,
            last_inclusion_proof: vec![leaf_for(&a1)],
            linear_proof: Some(LinearProof {
                source_tx_id: 2,
                target_tx_id: 3,
                terms: vec![a2, h3.inner_hash().unwrap()],
            }),
            linear_advance_proof: None,
        };
        verify_dual(&proof, 1, 3, &a1, &a3).unwrap();
        assert_eq!(
            verify_dual(&proof, 1, 3, &a2, &a3),
            Err(VerifyError::SourceAlhMismatch { tx: 1 })
        );
        assert_eq!(
            verify_dual(&proof, 1, 3, &a1, &a2),
            Err(VerifyError::TargetAlhMismatch { tx: 3 })
        );
        assert!(matches!(
            verify_dual(&proof, 2, 3, &a1, &a3),
            Err(VerifyError::DualShape(_))
        ));
        let mut p = proof.clone();
        p.inclusion_proof[0] = d(0);
        assert_eq!(
            verify_dual(&p, 1, 3, &a1, &a3),
            Err(VerifyError::Inclusion { i: 1, j: 2 })
        );
        let mut p = proof.clone();
        p.last_inclusion_proof.clear();
        assert_eq!(
            verify_dual(&p, 1, 3, &a1, &a3),
            Err(VerifyError::LastInclusion { i: 2 })
        );
        let mut p = proof.clone();
        p.consistency_proof.push(d(0));
        assert!(matches!(
            verify_dual(&p, 1, 3, &a1, &a3),
            Err(VerifyError::UnexpectedProof { .. })
        ));
        let mut p = proof.clone();
        p.linear_proof = None;
        assert!(matches!(
            verify_dual(&p, 1, 3, &a1, &a3),
            Err(VerifyError::Linear { .. })
        ));
        // i == j: tx 3 against itself
        let same = DualProof {
            source_tx_header: h3.clone(),
            target_tx_header: h3.clone(),
            inclusion_proof: vec![],
            consistency_proof: vec![],
            target_bl_tx_alh: a2,
            last_inclusion_proof: vec![leaf_for(&a1)],
            linear_proof: Some(LinearProof {
                source_tx_id: 3,
                target_tx_id: 3,
                terms: vec![a3],
            }),
            linear_advance_proof: None,
        };
        verify_dual(&same, 3, 3, &a3, &a3).unwrap();
    }

    #[test]
    fn header_checks_and_versions() {
        let mut h = header(2, d(1), 1, d(2));
        h.check().unwrap();
        h.version = 2;
        assert_eq!(h.inner_hash(), Err(VerifyError::UnsupportedVersion(2)));
        assert!(h.check().is_err());
        let mut h = header(2, d(1), 2, d(2));
        assert!(matches!(h.check(), Err(VerifyError::HeaderSanity { .. })));
        h.bl_tx_id = 0;
        assert!(h.check().is_err(), "blRoot must be zero with blTxId 0");
        let mut h = header(0, d(1), 0, [0; 32]);
        assert!(h.check().is_err());
        h.id = 1;
        h.check().unwrap();
        h.nentries = 0;
        assert!(h.check().is_err());
        let mut h = header(1, d(1), 0, [0; 32]);
        h.version = 0;
        h.metadata.truncated_tx_id = 5;
        assert!(h.inner_hash().is_err());
        h.version = 1;
        h.inner_hash().unwrap();
        h.metadata.extra = vec![0; MAX_TX_METADATA_EXTRA_LEN + 1];
        assert!(h.inner_hash().is_err());
    }

    #[test]
    fn tx_metadata_changes_the_v1_hash() {
        let h = header(3, d(1), 2, d(2));
        let mut with_md = h.clone();
        with_md.metadata.extra = b"x".to_vec();
        assert_ne!(h.inner_hash().unwrap(), with_md.inner_hash().unwrap());
        assert_eq!(
            with_md.metadata.to_bytes().unwrap(),
            vec![0x01, 0x00, 0x01, b'x']
        );
        let md = TxMetadata {
            truncated_tx_id: 9,
            extra: vec![],
        };
        assert_eq!(
            md.to_bytes().unwrap(),
            [&[0u8][..], &9u64.to_be_bytes()].concat()
        );
    }

    #[test]
    fn kv_metadata_round_trip_and_strict_parse() {
        let all = KvMetadata {
            deleted: true,
            expires_at: Some(1_700_000_000),
            non_indexable: true,
        };
        let b = all.to_bytes();
        assert_eq!(hex::encode(&b), "0001000000006553f10002");
        assert_eq!(KvMetadata::from_bytes(&b).unwrap(), all);
        assert_eq!(KvMetadata::from_bytes(&[]).unwrap(), KvMetadata::default());
        for bad in [&[0x02, 0x00][..], &[0x00, 0x00], &[0x01, 0, 0], &[0x03]] {
            assert!(KvMetadata::from_bytes(bad).is_err(), "{bad:?}");
        }
        // metadata is refused in v0 digests and changes v1 digests
        let k = plain_key(b"k");
        let v = plain_value(b"v");
        assert!(entry_spec_digest(0, &k, &all, &v).is_err());
        assert_ne!(
            entry_spec_digest(1, &k, &all, &v).unwrap(),
            entry_spec_digest(1, &k, &KvMetadata::default(), &v).unwrap()
        );
        assert!(entry_spec_digest(2, &k, &KvMetadata::default(), &v).is_err());
        assert!(entry_spec_digest(1, &[], &KvMetadata::default(), &v).is_err());
    }

    #[test]
    fn verify_tx_entries_checks_count_and_eh() {
        let entries: Vec<TxEntry> = (0..3u8)
            .map(|i| TxEntry {
                key: plain_key(&[b'k', i]),
                h_value: sha256(&plain_value(&[i])),
                v_len: 2,
                metadata: KvMetadata::default(),
            })
            .collect();
        let digests: Vec<Digest> = entries
            .iter()
            .map(|e| tx_entry_digest(1, e).unwrap())
            .collect();
        let mut h = header(5, d(1), 4, d(2));
        h.nentries = 3;
        h.eh = htree_root(&digests);
        assert_eq!(verify_tx_entries(&h, &entries).unwrap(), digests);
        assert_eq!(
            entry_spec_digest(
                1,
                &plain_key(b"k\x01"),
                &KvMetadata::default(),
                &plain_value(&[1])
            )
            .unwrap(),
            digests[1]
        );
        assert!(matches!(
            verify_tx_entries(&h, &entries[..2]),
            Err(VerifyError::EntryCount { .. })
        ));
        let mut swapped = entries.clone();
        swapped.swap(0, 1);
        assert_eq!(
            verify_tx_entries(&h, &swapped),
            Err(VerifyError::EntriesHashMismatch { tx: 5 })
        );
        assert_eq!(
            expect_entry(
                1,
                &entries,
                &digests,
                &plain_key(b"k\x02"),
                &KvMetadata::default(),
                &plain_value(&[2])
            ),
            Ok(2)
        );
        assert!(matches!(
            expect_entry(
                1,
                &entries,
                &digests,
                &plain_key(b"k\x02"),
                &KvMetadata::default(),
                &plain_value(&[3])
            ),
            Err(VerifyError::EntryMismatch { .. })
        ));
        let deleted = KvMetadata {
            deleted: true,
            ..KvMetadata::default()
        };
        assert!(matches!(
            expect_entry(
                1,
                &entries,
                &digests,
                &plain_key(b"k\x02"),
                &deleted,
                &plain_value(&[2])
            ),
            Err(VerifyError::EntryMismatch { .. })
        ));
        assert!(matches!(
            expect_entry(
                1,
                &entries,
                &digests,
                &plain_key(b"zz"),
                &KvMetadata::default(),
                &plain_value(&[2])
            ),
            Err(VerifyError::EntryNotFound { .. })
        ));
        let mut neg = entries.clone();
        neg[2].v_len = -1;
        assert!(verify_tx_entries(&h, &neg).is_err());
    }

    #[test]
    fn digest_from_slice_rejects_wrong_lengths() {
        assert!(digest_from_slice("x", &[0; 32]).is_ok());
        for n in [0, 31, 33] {
            assert_eq!(
                digest_from_slice("x", &vec![0; n]),
                Err(VerifyError::BadDigestLength { what: "x", len: n })
            );
        }
        assert!(digests_from_slices("t", &[vec![0u8; 32], vec![0u8; 2]]).is_err());
    }

    #[test]
    fn encodings() {
        assert_eq!(
            reference_value(0, b"key1"),
            hex::decode("010000000000000000006b657931").unwrap()
        );
        assert_eq!(
            zadd_key(b"set1", 1.5, b"key1", 0),
            hex::decode(
                "010000000000000004736574313ff80000000000000000000000000005006b6579310000000000000000"
            )
            .unwrap()
        );
        assert_eq!(
            signed_state_payload("defaultdb", 2, &[0xab; 32])[..21],
            hex::decode("0000000964656661756c7464620000000000000002").unwrap()[..]
        );
    }
}
