//! The start-up scan of the cache directory: what earlier mounts left, dealt with before this
//! one serves anything.
//!
//! For every entry of an instance that is no longer alive (its lock is free, see
//! [`crate::cache_dir`]):
//! - a clean copy (its journal says the data file holds nothing that is not in S3) is deleted;
//! - a multipart upload recorded in the journal is aborted, unless it can be completed from the
//!   parts already in and the bytes kept in the data file (a stream the process wrote out when
//!   it had to stop);
//! - a data file with changes not in S3 is **uploaded** when the object is still the version it
//!   started from (same ETag, or still absent for a new file), through the same code as a
//!   flush (ranges not in the file are the base's, fetched with `If-Match`); otherwise it is
//!   kept, and the log says where the bytes are, which key, and why they were not uploaded.
//!
//! Entries of other buckets (a cache directory shared by mounts of several buckets) are left
//! for a mount of their bucket; files that carry no journal record (written by an older s3vol,
//! or unknown) are never touched. What stays counts against the disk budget ([`Disk::pin`]),
//! so restarts cannot grow the directory past it with clean copies. The scan runs before the
//! filesystem is served, so nothing written through the new mount can race with a recovered
//! upload of the same key. Between the scan's HEAD and its upload another client could still
//! write the key; that window is the same as for any flush.
//!
//! [`Disk::pin`]: crate::budget::Disk::pin

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use s3vol_s3::{CompletedPart, ETag, S3Error, UploadId, UserMetadata};

use crate::cache_dir::{Entry, Record, stem_with_ext as with_ext, try_lock};
use crate::parts::PartArena;
use crate::stage::{StageCtx, Staged};

/// What the scan found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub dropped: u64,
    pub dropped_bytes: u64,
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    pub kept: u64,
    pub kept_bytes: u64,
    pub aborted: u64,
    /// Instances still alive (another mount uses the directory): left alone.
    pub live_instances: u64,
    /// The entries kept (their stem and key), for a successor whose handles still write them.
    pub kept_files: Vec<(std::path::PathBuf, String)>,
    /// Files a dead predecessor left that the application still has open for writing (see
    /// [`scan`]): taken over by this instance (their new stem, and key), not uploaded.
    pub deferred: Vec<(std::path::PathBuf, String)>,
}

/// One leftover: the files sharing a stem.
#[derive(Debug, Default)]
struct Leftover {
    exts: BTreeSet<String>,
}

fn is_instance(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Splits `<instance>-<n>.<ext>` into its stem and extension.
fn entry_name(name: &str) -> Option<(&str, &str, &str)> {
    let (stem, ext) = name.split_once('.')?;
    let (instance, n) = stem.split_once('-')?;
    if !is_instance(instance) || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    matches!(ext, "data" | "key" | "meta" | "meta.tmp" | "key.tmp").then_some((instance, stem, ext))
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Scans the cache directory of `ctx` (see the module docs) and logs one line with what it
/// found.
///
/// `writing` names the keys a successor's adopted handles still have open for writing: what
/// the dead predecessor left of those is not uploaded (no other client must see a file before
/// the application's flush, as without the event), but renamed to entries of this instance
/// and listed in [`ScanReport::deferred`], for the handles to go on from
/// ([`Staged::continued`], [`Staged::recovered`]).
pub async fn scan(ctx: &Arc<StageCtx>, writing: &HashSet<String>) -> ScanReport {
    let dir = ctx.cache.path().to_owned();
    let mut report = ScanReport::default();
    let mut instances: BTreeMap<String, BTreeMap<String, Leftover>> = BTreeMap::new();
    let mut locks: BTreeSet<String> = BTreeSet::new();
    let mut unknown_bytes = 0;
    let read = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(cache_dir = %dir.display(), error = %e, "cannot scan the cache directory");
            return report;
        }
    };
    for item in read.flatten() {
        let Ok(name) = item.file_name().into_string() else {
            continue;
        };
        if let Some(instance) = name.strip_suffix(".lock")
            && is_instance(instance)
        {
            locks.insert(instance.to_owned());
        } else if let Some(instance) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".lock.tmp"))
            && is_instance(instance)
        {
            // A process died between creating its lock and naming it.
            if File::open(item.path()).is_ok_and(|f| try_lock(&f)) {
                let _ = std::fs::remove_file(item.path());
            }
        } else if let Some((instance, stem, ext)) = entry_name(&name) {
            instances
                .entry(instance.to_owned())
                .or_default()
                .entry(stem.to_owned())
                .or_default()
                .exts
                .insert(ext.to_owned());
        } else if name.ends_with(".data") {
            // Not ours to judge (an older s3vol's `<pid>-<n>.data`, or a stranger's).
            let size = size_of(&item.path());
            unknown_bytes += size;
            tracing::warn!(
                file = %item.path().display(),
                size,
                "a file in the cache directory has no journal record (an older s3vol's staging \
                 file?); left as it is, see its .key companion for the object it belongs to"
            );
        }
    }
    for instance in &locks {
        instances.entry(instance.clone()).or_default();
    }
    for (instance, entries) in instances {
        if instance == ctx.cache.instance() {
            continue;
        }
        let lock_path = dir.join(format!("{instance}.lock"));
        // Held while this instance's entries are dealt with: two mounts starting at once do
        // not both recover the same file.
        let lock = match File::open(&lock_path) {
            Ok(f) if try_lock(&f) => Some(f),
            Ok(_) => {
                report.live_instances += 1;
                continue;
            }
            Err(_) => None,
        };
        let mut remaining = false;
        for (stem, leftover) in entries {
            let stem = dir.join(stem);
            if !recover_entry(ctx, &stem, &leftover, writing, &mut report).await {
                remaining = true;
            }
        }
        if !remaining && lock.is_some() {
            let _ = std::fs::remove_file(&lock_path);
        }
    }
    report.kept_bytes += unknown_bytes;
    ctx.disk.pin(report.kept_bytes);
    metrics::counter!("s3vol_cache_scan_files_total", "outcome" => "dropped")
        .increment(report.dropped);
    metrics::counter!("s3vol_cache_scan_files_total", "outcome" => "uploaded")
        .increment(report.uploaded);
    metrics::counter!("s3vol_cache_scan_files_total", "outcome" => "kept").increment(report.kept);
    metrics::counter!("s3vol_cache_scan_uploads_aborted_total").increment(report.aborted);
    metrics::gauge!("s3vol_cache_kept_bytes").set(report.kept_bytes as f64);
    tracing::info!(
        cache_dir = %dir.display(),
        clean_dropped = report.dropped,
        clean_dropped_bytes = report.dropped_bytes,
        uploaded = report.uploaded,
        uploaded_bytes = report.uploaded_bytes,
        kept = report.kept,
        kept_bytes = report.kept_bytes,
        uploads_aborted = report.aborted,
        other_live_mounts = report.live_instances,
        "cache directory scanned: {} clean copies dropped, {} files with data not in S3 uploaded, \
         {} kept in the cache directory ({} bytes), {} unfinished multipart uploads aborted",
        report.dropped,
        report.uploaded,
        report.kept,
        report.kept_bytes,
        report.aborted
    );
    report
}

/// Turns the part buffers a dead predecessor left in use in the arena (see [`crate::parts`])
/// into what a process that exits on purpose leaves of a streamed file: its bytes at their
/// offsets in the entry's staging file (fsynced) and a journal record of the stream, which
/// the scan then completes or uploads. A slot is freed only once its bytes are on disk; one
/// that cannot be written stays in memory, and the log says so. Returns how many files and
/// bytes were taken over.
pub fn take_over_parts(ctx: &StageCtx, arena: &PartArena) -> (u64, u64) {
    let mut by_stem: BTreeMap<String, Vec<crate::parts::Leftover>> = BTreeMap::new();
    for slot in arena.leftovers() {
        by_stem.entry(slot.stem.clone()).or_default().push(slot);
    }
    let (mut files, mut bytes) = (0, 0);
    for (name, slots) in by_stem {
        let held: u64 = slots.iter().map(|s| s.len).sum();
        let key = slots.first().map(|s| s.key.clone()).unwrap_or_default();
        let valid = entry_name(&format!("{name}.data")).is_some_and(|(_, stem, _)| stem == name);
        let written = if valid {
            write_parts(ctx, arena, &ctx.cache.path().join(&name), &slots)
        } else {
            Err(std::io::Error::other(format!(
                "no staging entry is named {name:?}"
            )))
        };
        match written {
            Ok(path) => {
                tracing::warn!(key, bytes = held, staging_file = %path.display(), "bytes a dead serving process held in part buffers moved to the cache directory");
                for slot in &slots {
                    arena.release_leftover(slot);
                }
                files += 1;
                bytes += held;
            }
            Err(e) => tracing::error!(
                key,
                bytes = held,
                error = %e,
                "bytes a dead serving process held in part buffers cannot be written to the                  cache directory: they stay in memory (the part buffers' memory file), and are                  lost if the mount ends before a later serving process moves them"
            ),
        }
    }
    (files, bytes)
}

/// Writes the bytes of one staging entry's leftover slots to its data file and journal.
fn write_parts(
    ctx: &StageCtx,
    arena: &PartArena,
    stem: &Path,
    slots: &[crate::parts::Leftover],
) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let existing = std::fs::read_to_string(with_ext(stem, "meta"))
        .ok()
        .and_then(|t| Record::parse(&t));
    let journaled = existing.is_some();
    let mut record = existing.unwrap_or_else(|| {
        let key = slots
            .iter()
            .find(|s| s.filling)
            .or(slots.first())
            .map_or("", |s| s.key.as_str());
        let mut r = Record::new(ctx.bucket.as_str(), key);
        // The object version it replaces, with none of its bytes in use.
        r.base = slots
            .iter()
            .find_map(|s| s.base.clone())
            .map(|etag| crate::cache_dir::BaseRecord { etag, size: 0 });
        r
    });
    let end = slots.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
    let mut local = crate::ranges::RangeSet::new();
    for &(a, b) in &record.local {
        local.insert(a..b);
    }
    for s in slots {
        local.insert(s.offset..s.offset + s.len);
    }
    // The tail (or a small file) is filling from the offset the upload reached; without one,
    // the parts end the file (the scan learns from S3 where the upload's parts end).
    record.streamed = slots
        .iter()
        .filter(|s| s.filling)
        .map(|s| s.offset)
        .min()
        .unwrap_or(end);
    record.part_size = ctx.stream_part_size();
    record.size = record.size.max(end);
    record.dirty = true;
    record.local = local.iter().map(|r| (r.start, r.end)).collect();
    let mut entry = Entry::new(stem.to_owned());
    if !journaled {
        // The record first, as for any new entry: a data file never exists without one.
        entry.write_record(&record)?;
    }
    let path = with_ext(stem, "data");
    let data = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    for s in slots {
        data.write_all_at(arena.leftover_bytes(s), s.offset)?;
    }
    if data.metadata()?.len() < end {
        data.set_len(end)?;
    }
    data.sync_all()?;
    if journaled {
        Entry::adopt(stem.to_owned(), data).write_record(&record)?;
    }
    File::open(with_ext(stem, "meta"))?.sync_all()?;
    if let Some(dir) = stem.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(path)
}

fn remove_all(stem: &Path) {
    Entry::new(stem.to_owned()).remove_leftovers();
}

/// Logs and counts a leftover that stays.
fn keep(report: &mut ScanReport, stem: &Path, key: &str, size: u64, why: &str) {
    report.kept += 1;
    report.kept_bytes += size;
    report.kept_files.push((stem.to_owned(), key.to_owned()));
    tracing::warn!(
        key,
        size,
        staging_file = %with_ext(stem, "data").display(),
        journal = %with_ext(stem, "meta").display(),
        why,
        "data not in S3 kept in the cache directory, not uploaded"
    );
}

/// Aborts `id`: `Ok` when it is gone (aborted now, or already).
async fn abort(
    ctx: &StageCtx,
    key: &str,
    id: &str,
    report: &mut ScanReport,
) -> Result<(), S3Error> {
    abort_open(ctx, key, id, report).await.map(|_| ())
}

/// Aborts `id`: `Ok(true)` when this call aborted it, `Ok(false)` when S3 knows no such upload
/// (aborted, or completed, already).
async fn abort_open(
    ctx: &StageCtx,
    key: &str,
    id: &str,
    report: &mut ScanReport,
) -> Result<bool, S3Error> {
    match ctx
        .store
        .abort_multipart_upload(&ctx.bucket, key, &UploadId(id.to_owned()))
        .await
    {
        Ok(()) => {
            report.aborted += 1;
            tracing::info!(
                key,
                upload_id = id,
                "aborted a multipart upload an earlier mount left"
            );
            Ok(true)
        }
        Err(S3Error::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What the object `key` is once a staging file's own upload turned out gone already (see
/// [`recover_entry`]): `Ok(true)` when it is this file (`size` bytes, no longer the version
/// `expected` the file started from: the upload was completed), `Ok(false)` when it is still
/// that version, `Err` with the reason to keep the file otherwise.
async fn settled_upload(
    ctx: &StageCtx,
    key: &str,
    expected: Option<&str>,
    size: u64,
) -> Result<bool, String> {
    let expected = expected.map(|e| e.trim_matches('"'));
    match ctx.store.head_object(&ctx.bucket, key).await {
        Ok(info) if Some(info.etag.as_str().trim_matches('"')) == expected => Ok(false),
        Ok(info) if info.size == size => Ok(true),
        Ok(_) => Err("the object changed in S3 while this file was recovered".to_owned()),
        Err(S3Error::NotFound(_)) if expected.is_none() => Ok(false),
        Err(S3Error::NotFound(_)) => {
            Err("the object was deleted in S3 while this file was recovered".to_owned())
        }
        Err(e) => Err(format!(
            "S3 could not be asked whether the object changed: {e}"
        )),
    }
}

/// Deals with one leftover; true when nothing of it remains.
async fn recover_entry(
    ctx: &Arc<StageCtx>,
    stem: &Path,
    leftover: &Leftover,
    writing: &HashSet<String>,
    report: &mut ScanReport,
) -> bool {
    let data_path = with_ext(stem, "data");
    let has_data = leftover.exts.contains("data");
    let record = std::fs::read_to_string(with_ext(stem, "meta"))
        .ok()
        .and_then(|t| Record::parse(&t));
    let Some(mut record) = record else {
        if has_data {
            keep(
                report,
                stem,
                "?",
                size_of(&data_path),
                "its journal record is missing or unreadable",
            );
            return false;
        }
        // Companions of a file that was never made: nothing of value.
        remove_all(stem);
        return true;
    };
    let size = if has_data { size_of(&data_path) } else { 0 };
    if !record.dirty && record.upload_id.is_none() && record.abandoned.is_empty() {
        // A clean copy, whichever bucket it came from: S3 has every byte of it.
        if has_data {
            report.dropped += 1;
            report.dropped_bytes += size;
        }
        remove_all(stem);
        return true;
    }
    if record.bucket != ctx.bucket.as_str() {
        keep(
            report,
            stem,
            &record.key,
            size,
            &format!(
                "it belongs to bucket {}: a mount of that bucket with this cache directory recovers it",
                record.bucket
            ),
        );
        return false;
    }
    let key = record.key.clone();
    for id in std::mem::take(&mut record.abandoned) {
        if let Err(e) = abort(ctx, &key, &id, report).await {
            tracing::warn!(key, upload_id = id, error = %e, "cannot abort an unfinished multipart upload; tried again at the next start");
            record.abandoned.push(id);
        }
    }
    // A stream's record: its bytes are in the upload's parts and (those in part buffers at
    // the death) the data file. Without a data file, every byte is in the parts only if the
    // part buffers outlived the process (a successor of the same supervisor) and held none:
    // the handles that go on from it find out ([`Staged::continued`]); a scan that finds it
    // otherwise cannot know, and aborts the upload below, as for an unsupervised mount's.
    // A stream still being written goes on without asking S3 anything: its completion
    // replaces the object whatever it is then, as without the event, and learns itself
    // whether the upload was completed before the death. (A staging file is deferred only
    // below, once the object is known to be still the version it started from.)
    if record.dirty && record.part_size > 0 && writing.contains(&key) {
        return defer(ctx, stem, &mut record, report).await;
    }
    if !has_data || !record.dirty {
        if let Some(id) = record.upload_id.take()
            && let Err(e) = abort(ctx, &key, &id, report).await
        {
            record.upload_id = Some(id);
            tracing::warn!(key, error = %e, "cannot abort an unfinished multipart upload; tried again at the next start");
        }
        if record.upload_id.is_some() || !record.abandoned.is_empty() {
            // Only the record stays, for the next start.
            let mut e = Entry::new(stem.to_owned());
            if has_data {
                let _ = std::fs::remove_file(&data_path);
            }
            let _ = e.write_record(&record);
            report.dropped += u64::from(has_data);
            return false;
        }
        if has_data {
            report.dropped += 1;
            report.dropped_bytes += size;
        }
        remove_all(stem);
        return true;
    }
    let data = match File::options().read(true).write(true).open(&data_path) {
        Ok(f) => f,
        Err(e) => {
            keep(report, stem, &key, size, &format!("cannot open it: {e}"));
            return false;
        }
    };
    // Is the object still the version this file started from?
    let current = match ctx.store.head_object(&ctx.bucket, &key).await {
        Ok(info) => Some(info),
        Err(S3Error::NotFound(_)) => None,
        Err(e) => {
            keep(
                report,
                stem,
                &key,
                size,
                &format!("S3 could not be asked whether the object changed: {e}"),
            );
            return false;
        }
    };
    let expected = record.base.as_ref().map(|b| b.etag.as_str());
    let found = current.as_ref().map(|i| i.etag.as_str());
    let unchanged = match (expected, found) {
        (None, None) => true,
        (Some(a), Some(b)) => a.trim_matches('"') == b.trim_matches('"'),
        _ => false,
    };
    if !unchanged
        && let Some(info) = &current
        && info.size == size
        && same_content(&data, &info.etag, crate::stage::upload_part_size(ctx, size))
    {
        // A process that died between its upload and the update of this record (a serving
        // process killed under a supervisor, typically, or during the completion of a
        // multipart upload whose answer it never read): the object is this very file.
        // Uploading it again later, once the name is renamed or removed, would bring it back.
        tracing::info!(key, staging_file = %data_path.display(), "a staged file is already in S3 as it is; dropped");
        report.dropped += 1;
        report.dropped_bytes += size;
        remove_all(stem);
        return true;
    }
    if !unchanged
        && let Some(info) = &current
        && info.size == size
        && record.part_size == 0
        && let Some(id) = &record.upload_id
        && matches!(
            ctx.store
                .list_parts(&ctx.bucket, &key, &UploadId(id.clone()))
                .await,
            Err(S3Error::NotFound(_))
        )
    {
        // The staging file's own multipart upload (recorded before it started) is gone and
        // the object has the file's size: the process died after S3 completed the upload and
        // before this record said so. The data file cannot prove it byte for byte (ranges of
        // the old version it never fetched are holes in it, and the parts copied from that
        // version server-side), but nothing else completes an upload of ours: the object is
        // this file.
        tracing::info!(key, staging_file = %data_path.display(), upload_id = id, "a staged file's multipart upload completed before its process could record it; dropped");
        report.dropped += 1;
        report.dropped_bytes += size;
        remove_all(stem);
        return true;
    }
    if !unchanged {
        keep(
            report,
            stem,
            &key,
            size,
            &format!(
                "the object changed in S3 since this file was staged (expected {}, found {})",
                expected.unwrap_or("no object"),
                found.unwrap_or("no object")
            ),
        );
        return false;
    }
    if record.upload_id.is_some() && record.part_size > 0 {
        // A stream written out at exit: the data file holds only what was in memory.
        return complete_stream(ctx, stem, Some(&data), &record, size, report).await;
    }
    // Whether an upload of this file may have been completed by S3 after the HEAD above.
    let mut raced = false;
    if let Some(id) = record.upload_id.clone() {
        match abort_open(ctx, &key, &id, report).await {
            Ok(true) => {}
            Ok(false) => {
                raced = true;
                // Gone already: ended by its process, or completed — perhaps only now, by a
                // completion still on its way when the process died, after the HEAD above.
                match settled_upload(ctx, &key, expected, size).await {
                    Ok(true) => {
                        tracing::info!(key, staging_file = %data_path.display(), upload_id = id, "a staged file's multipart upload completed as its process died; dropped");
                        report.dropped += 1;
                        report.dropped_bytes += size;
                        remove_all(stem);
                        return true;
                    }
                    Ok(false) => {}
                    Err(why) => {
                        keep(report, stem, &key, size, &why);
                        return false;
                    }
                }
            }
            Err(e) => {
                keep(
                    report,
                    stem,
                    &key,
                    size,
                    &format!("its unfinished upload {id} cannot be aborted: {e}"),
                );
                return false;
            }
        }
    }
    record.upload_id = None;
    if writing.contains(&key) && !raced {
        // (After a race, the upload below settles it: with `If-Match` on the version the
        // file started from, it fails and keeps the file if the object is the upload's.)
        return defer(ctx, stem, &mut record, report).await;
    }
    let metadata: UserMetadata = match (&record.metadata, &current) {
        (Some(m), _) => m.clone(),
        (None, Some(info)) => info.metadata.clone(),
        (None, None) => UserMetadata::new(),
    };
    let content_type = current.as_ref().and_then(|i| i.content_type.clone());
    let entry = Entry::adopt(stem.to_owned(), data);
    let mut staged = Staged::recovered(ctx.clone(), entry, &record, size);
    match staged.upload(&metadata, content_type).await {
        Ok(_) => {
            report.uploaded += 1;
            report.uploaded_bytes += size;
            tracing::warn!(
                key,
                size,
                from = %data_path.display(),
                "uploaded data an earlier mount left in the cache directory"
            );
            // Clean now: dropping it deletes its files.
            drop(staged);
            true
        }
        Err(e) => {
            keep(
                report,
                stem,
                &key,
                size,
                &format!("the upload failed: {}", e.message),
            );
            false
        }
    }
}

/// Recovers the entry `stem` of this instance as the start-up scan does an entry of a dead
/// one (for what [`scan`] deferred and no handle went on from); true when nothing of it
/// remains. One difference: a stream with no data file is completed from its upload's parts,
/// not aborted. Here, unlike in a scan, the part buffers are known to have outlived the
/// process (this is its successor), so with none of them left every byte is in the parts.
pub async fn recover_left(ctx: &Arc<StageCtx>, stem: &Path) -> bool {
    let mut leftover = Leftover::default();
    for ext in ["data", "meta", "key"] {
        if with_ext(stem, ext).exists() {
            leftover.exts.insert(ext.to_owned());
        }
    }
    let mut report = ScanReport::default();
    let record = std::fs::read_to_string(with_ext(stem, "meta"))
        .ok()
        .and_then(|t| Record::parse(&t));
    let done = match record {
        Some(r)
            if !leftover.exts.contains("data")
                && r.dirty
                && r.part_size > 0
                && r.upload_id.is_some()
                && r.bucket == ctx.bucket.as_str() =>
        {
            complete_stream(ctx, stem, None, &r, 0, &mut report).await
        }
        _ => recover_entry(ctx, stem, &leftover, &HashSet::new(), &mut report).await,
    };
    ctx.disk.pin(report.kept_bytes);
    done
}

/// An entry of a file the application still has open for writing (see [`scan`]): renamed to
/// an entry of this instance (data file first: a death in between leaves the bytes under one
/// stem or the other) and listed for the handles.
async fn defer(
    ctx: &Arc<StageCtx>,
    stem: &Path,
    record: &mut Record,
    report: &mut ScanReport,
) -> bool {
    let key = record.key.clone();
    if record.part_size == 0 {
        // The record as the scan left it (its own upload aborted).
        if let Err(e) = Entry::found(stem.to_owned()).write_record(record) {
            tracing::warn!(key, error = %e, "cannot update a journal record");
        }
    }
    let new = ctx.cache.new_stem();
    for ext in ["data", "meta", "key"] {
        match std::fs::rename(with_ext(stem, ext), with_ext(&new, ext)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && ext != "meta" => {}
            Err(e) => {
                let size = size_of(&with_ext(stem, "data")) + size_of(&with_ext(&new, "data"));
                keep(
                    report,
                    stem,
                    &key,
                    size,
                    &format!("it cannot be taken over for the handles still writing it: {e}"),
                );
                return false;
            }
        }
    }
    remove_all(stem);
    tracing::info!(key, staging_file = %with_ext(&new, "data").display(), "a file open for writing across the death of its serving process is left to its handles, for their next flush to upload");
    report.deferred.push((new, key));
    true
}

/// Completes a stream's multipart upload from the parts already in and the bytes the data
/// file holds (if there is one); aborts it and keeps the file when they do not cover the
/// whole file.
async fn complete_stream(
    ctx: &Arc<StageCtx>,
    stem: &Path,
    data: Option<&File>,
    record: &Record,
    size: u64,
    report: &mut ScanReport,
) -> bool {
    let key = record.key.clone();
    let Some(id) = record.upload_id.clone() else {
        return false;
    };
    let part = record.part_size.max(1);
    // The parts S3 holds: the record names those a process knew of at exit; a process that
    // was killed knew of none (its part buffers held only what S3 did not have yet).
    let listed = match ctx
        .store
        .list_parts(&ctx.bucket, &key, &UploadId(id.clone()))
        .await
    {
        Ok(listed) => listed,
        Err(e) => {
            keep(
                report,
                stem,
                &key,
                size,
                &format!("the parts of its upload {id} cannot be listed: {e}"),
            );
            return false;
        }
    };
    let local = {
        let mut r = crate::ranges::RangeSet::new();
        for &(a, b) in &record.local {
            r.insert(a..b);
        }
        r
    };
    let mut record = record.clone();
    let mut sizes = BTreeMap::new();
    for p in &listed {
        record.parts.retain(|r| r.number != p.part_number);
        record.parts.push(crate::cache_dir::PartRecord {
            number: p.part_number,
            etag: p.etag.as_str().to_owned(),
        });
        sizes.insert(p.part_number, p.size);
        // Without a tail in the data file, the file ends where the listed parts do (past the
        // data file when the last parts were in S3 and no longer in memory).
        let end = (p.part_number.max(1) as u64 - 1) * part + p.size;
        if end > record.streamed
            && !local
                .missing(record.streamed..record.streamed + 1)
                .is_empty()
        {
            record.streamed = end;
        }
    }
    let size = size.max(record.streamed);
    let record = &record;
    // A part the data file holds whole goes again from there: those bytes are the newest (a
    // part S3 holds may be an earlier, shorter tail of the same number).
    let in_upload: BTreeMap<i32, &str> = record
        .parts
        .iter()
        .map(|p| (p.number, p.etag.as_str()))
        .collect();
    // Parts 1..=n cover [0, streamed); the tail [streamed, size) is the last part.
    let count = record.streamed.div_ceil(part);
    let mut plan = Vec::new();
    let mut covered = true;
    for i in 0..count {
        let number = i as i32 + 1;
        let range = i * part..((i + 1) * part).min(record.streamed);
        let whole = sizes
            .get(&number)
            .is_none_or(|&n| n == range.end - range.start);
        match in_upload.get(&number) {
            _ if local.missing(range.clone()).is_empty() => plan.push((number, range, None)),
            Some(etag) if whole => plan.push((number, range, Some(etag.to_string()))),
            _ => covered = false,
        }
    }
    if size > record.streamed {
        let range = record.streamed..size;
        if local.missing(range.clone()).is_empty() {
            plan.push((count as i32 + 1, range, None));
        } else {
            covered = false;
        }
    }
    if plan.is_empty() && covered {
        // Not a byte to complete it with: a file that stayed empty.
        if abort(ctx, &key, &id, report).await.is_ok() {
            remove_all(stem);
            return true;
        }
    }
    if !covered {
        let why = match abort(ctx, &key, &id, report).await {
            Ok(()) => format!(
                "parts of the file were neither in the upload nor in the data file (in flight \
                 when the process ended); upload {id} aborted, the data file holds the rest"
            ),
            Err(e) => format!("incomplete, and its upload {id} cannot be aborted: {e}"),
        };
        keep(report, stem, &key, size, &why);
        return false;
    }
    let upload_id = UploadId(id.clone());
    let mut parts = Vec::new();
    for (number, range, etag) in plan {
        if let Some(etag) = etag {
            parts.push(CompletedPart {
                part_number: number,
                etag: ETag(etag),
            });
            continue;
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        let read = match data {
            Some(data) => data.read_exact_at(&mut buf, range.start),
            None => Err(std::io::Error::other("no data file")),
        };
        if let Err(e) = read {
            keep(report, stem, &key, size, &format!("cannot read it: {e}"));
            return false;
        }
        match ctx
            .store
            .upload_part(&ctx.bucket, &key, &upload_id, number, Bytes::from(buf))
            .await
        {
            Ok(p) => parts.push(p),
            Err(e) => {
                keep(
                    report,
                    stem,
                    &key,
                    size,
                    &format!("sending the rest of upload {id} failed: {e}"),
                );
                return false;
            }
        }
    }
    match ctx
        .store
        .complete_multipart_upload(&ctx.bucket, &key, &upload_id, &parts)
        .await
    {
        Ok(_) => {
            report.uploaded += 1;
            report.uploaded_bytes += size;
            tracing::warn!(key, size, from = %stem.display(), upload_id = id, "completed a multipart upload an earlier mount left, from its parts and the data file");
            remove_all(stem);
            true
        }
        Err(e) => {
            keep(
                report,
                stem,
                &key,
                size,
                &format!("completing upload {id} failed: {e}"),
            );
            false
        }
    }
}

/// Whether the object with `etag` holds exactly the bytes of `data`, as far as its ETag tells:
/// the MD5 of a single PUT, or `<MD5 of the parts' MD5s>-N` of a multipart upload whose parts
/// were `part_size` bytes (what s3vol uploads a file of that size with). An ETag of another
/// form (another store's scheme, other part sizes, SSE-KMS) never matches: the file is then
/// treated as changed in S3, which keeps it.
fn same_content(data: &File, etag: &ETag, part_size: u64) -> bool {
    use md5::{Digest, Md5};
    use std::io::Read;
    let etag = etag.as_str().trim_matches('"');
    let (hex, parts) = match etag.split_once('-') {
        None => (etag, None),
        Some((hex, n)) => match n.parse::<u64>() {
            Ok(n) if n > 0 => (hex, Some(n)),
            _ => return false,
        },
    };
    if hex.len() != 32 || part_size == 0 {
        return false;
    }
    let Ok(size) = data.metadata().map(|m| m.len()) else {
        return false;
    };
    if parts.is_some_and(|n| size.div_ceil(part_size) != n) {
        return false;
    }
    // Hashes the file in parts of `part_size` (one part for a single PUT).
    let chunk = if parts.is_some() { part_size } else { u64::MAX };
    let mut digests = Vec::new();
    let mut hash = Md5::new();
    let mut in_part = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut file = data;
    loop {
        let want = buf
            .len()
            .min(usize::try_from(chunk - in_part).unwrap_or(usize::MAX));
        match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                in_part += n as u64;
                if in_part == chunk {
                    digests.extend_from_slice(&hash.finalize_reset());
                    in_part = 0;
                }
            }
            Err(_) => return false,
        }
    }
    let last = hash.finalize();
    let sum = match parts {
        None => last.to_vec(),
        Some(_) => {
            if in_part > 0 {
                digests.extend_from_slice(&last);
            }
            Md5::digest(&digests).to_vec()
        }
    };
    let got: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    got == hex
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::budget::{BufPool, Disk, Memory};
    use crate::cache_dir::CacheDir;
    use crate::stage::Base;
    use futures::TryStreamExt;
    use s3vol_s3::{BucketName, MemStore, ObjectStore, PutOptions};

    /// An in-memory store with the bucket `bkt`.
    async fn mem_bucket() -> (Arc<MemStore>, BucketName) {
        let store = Arc::new(MemStore::new());
        let bucket = BucketName::new("bkt").unwrap();
        store.create_bucket(&bucket).await.unwrap();
        (store, bucket)
    }

    /// Part buffers of 5 MiB in a memory file, as a supervisor holds them.
    fn arena() -> Arc<PartArena> {
        let memfd = crate::parts::create_memfd().unwrap();
        Arc::new(PartArena::open(memfd, 5 << 20).unwrap())
    }

    async fn ctx(store: &Arc<MemStore>, dir: &Path) -> Arc<StageCtx> {
        let bucket = BucketName::new("bkt").unwrap();
        store.create_bucket(&bucket).await.unwrap();
        ctx_on(store.clone(), bucket, dir)
    }

    /// A staging context on `bucket` of `store`, which exists.
    fn ctx_on(store: Arc<dyn ObjectStore>, bucket: BucketName, dir: &Path) -> Arc<StageCtx> {
        ctx_with(store, bucket, dir, None)
    }

    /// The same, streaming into part buffers of `arena` (a supervised mount's).
    fn ctx_with(
        store: Arc<dyn ObjectStore>,
        bucket: BucketName,
        dir: &Path,
        arena: Option<Arc<PartArena>>,
    ) -> Arc<StageCtx> {
        Arc::new(StageCtx {
            stream: true,
            store,
            bucket,
            cache: Arc::new(CacheDir::open(dir).unwrap()),
            part_size: 5 << 20,
            memory: Arc::new(Memory::new(64 << 20)),
            disk: Arc::new(Disk::new(1 << 30)),
            parts: Arc::new(BufPool::new(5 << 20, 2)),
            arena,
            close_timeout: std::time::Duration::from_secs(60),
            min_throughput: 1 << 20,
        })
    }

    async fn put(ctx: &StageCtx, key: &str, body: &[u8]) -> Base {
        let r = ctx
            .store
            .put_object(
                &ctx.bucket,
                key,
                Bytes::copy_from_slice(body),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        Base {
            etag: r.etag,
            size: body.len() as u64,
        }
    }

    async fn get(ctx: &StageCtx, key: &str) -> Option<Vec<u8>> {
        let got = ctx
            .store
            .get_object(&ctx.bucket, key, None, None)
            .await
            .ok()?;
        let body: Vec<Bytes> = got.body.try_collect().await.unwrap();
        Some(body.concat())
    }

    fn meta() -> UserMetadata {
        UserMetadata::from([("mode".to_owned(), "33188".to_owned())])
    }

    fn data_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "data")
            })
            .count()
    }

    #[tokio::test]
    async fn a_dead_mounts_files_are_uploaded_dropped_or_kept_and_a_live_ones_left_alone() {
        let dir = crate::cache_dir::private_tempdir();
        let store = Arc::new(MemStore::new());
        let dead = ctx(&store, dir.path()).await;
        let original: Vec<u8> = (0..300_000u32).map(|i| (i / 7) as u8).collect();
        let mut leaked = Vec::new();

        // An edited object: two ranges written, the rest only in S3.
        let base = put(&dead, "edited", &original).await;
        let mut st = Staged::from_object(dead.clone(), "edited", base).unwrap();
        st.write(100_000, b"patched", meta).await.unwrap();
        st.write(299_000, b"tail", meta).await.unwrap();
        leaked.push(st);
        // A new file, written out of order.
        let mut st = Staged::new_empty(dead.clone(), "new", None).unwrap();
        st.write(5, b" world", meta).await.unwrap();
        st.write(0, b"hello", meta).await.unwrap();
        leaked.push(st);
        // An object another client replaces after the crash.
        let base = put(&dead, "raced", &original).await;
        let mut st = Staged::from_object(dead.clone(), "raced", base).unwrap();
        st.write(5, b"mine", meta).await.unwrap();
        leaked.push(st);
        // A clean copy.
        let base = put(&dead, "clean", &original).await;
        let mut st = Staged::from_object(dead.clone(), "clean", base).unwrap();
        st.write(5, b"done", meta).await.unwrap();
        st.upload(&meta(), None).await.unwrap();
        leaked.push(st);
        // A stream with parts in a multipart upload and the rest in memory.
        let mut st = Staged::new_empty(dead.clone(), "stream", None).unwrap();
        st.write(0, &vec![1u8; 12 << 20], meta).await.unwrap();
        leaked.push(st);
        // The process dies: nothing of it runs any more.
        for st in leaked {
            std::mem::forget(st);
        }
        dead.cache.unlock_as_if_dead();
        put(&dead, "raced", b"theirs").await;

        // Another mount using the directory, alive, with a dirty file.
        let live = ctx(&store, dir.path()).await;
        let mut other = Staged::new_empty(live.clone(), "live", None).unwrap();
        other.write(3, b"x", meta).await.unwrap();

        let fresh = ctx(&store, dir.path()).await;
        let report = scan(&fresh, &HashSet::new()).await;
        assert_eq!(
            (
                report.dropped,
                report.uploaded,
                report.kept,
                report.aborted,
                report.live_instances
            ),
            (1, 2, 1, 1, 1),
            "{report:?}"
        );
        let mut expected = original.clone();
        expected[100_000..100_007].copy_from_slice(b"patched");
        expected[299_000..299_004].copy_from_slice(b"tail");
        assert!(get(&fresh, "edited").await.unwrap() == expected);
        assert_eq!(get(&fresh, "new").await.unwrap(), b"hello world");
        assert_eq!(get(&fresh, "raced").await.unwrap(), b"theirs");
        assert!(
            get(&fresh, "stream").await.is_none(),
            "never closed, never in S3"
        );
        assert_eq!(
            data_files(dir.path()),
            2,
            "the kept file and the live mount's"
        );
        assert!(other.path().exists(), "a live mount's file is not touched");
        assert_eq!(
            fresh.disk.used(),
            original.len() as u64,
            "what stays counts"
        );
        // A second scan finds only what stays.
        let again = scan(&ctx(&store, dir.path()).await, &HashSet::new()).await;
        assert_eq!((again.uploaded, again.kept, again.dropped), (0, 1, 0));
    }

    /// A streamed file that the application still has open when its serving process dies
    /// goes on in the same multipart upload in the successor: the scan uploads nothing of it,
    /// the bytes the part buffers held go back into part buffers (and the data file away),
    /// and the next flush completes one upload with every byte, before and after the death.
    #[tokio::test]
    async fn a_stream_still_open_goes_on_in_its_upload_after_a_death() {
        let (store, bucket) = mem_bucket().await;
        let dir = crate::cache_dir::private_tempdir();
        let arena = arena();
        let dead = ctx_with(
            store.clone(),
            bucket.clone(),
            dir.path(),
            Some(arena.clone()),
        );
        let body: Vec<u8> = (0..(15u32 << 20) + 1000).map(|i| (i % 251) as u8).collect();
        let split = (12 << 20) + 1000;
        let mut st = Staged::new_empty(dead.clone(), "stream", None).unwrap();
        st.write(0, &body[..split], meta).await.unwrap();
        // The process dies: nothing of it runs any more; the supervisor keeps the memory file.
        let fd = arena.fd().try_clone_to_owned().unwrap();
        std::mem::forget(st);
        std::mem::forget(arena);
        dead.cache.unlock_as_if_dead();

        let arena = Arc::new(PartArena::open(fd, 5 << 20).unwrap());
        let fresh = ctx_with(store.clone(), bucket, dir.path(), Some(arena.clone()));
        let (files, _) = take_over_parts(&fresh, &arena);
        assert_eq!(files, 1);
        let writing: HashSet<String> = ["stream".to_owned()].into();
        let report = scan(&fresh, &writing).await;
        assert_eq!((report.uploaded, report.kept), (0, 0), "{report:?}");
        assert_eq!(report.deferred.len(), 1, "{report:?}");
        assert!(
            get(&fresh, "stream").await.is_none(),
            "not in S3 before a flush"
        );
        let (stem, key) = report.deferred[0].clone();
        assert_eq!(key, "stream");
        let record =
            Record::parse(&std::fs::read_to_string(with_ext(&stem, "meta")).unwrap()).unwrap();
        let data = File::options()
            .read(true)
            .write(true)
            .open(with_ext(&stem, "data"))
            .unwrap();
        let entry = Entry::adopt(stem.clone(), data);
        let mut st = Staged::continued(fresh.clone(), entry, &record)
            .await
            .expect("the stream goes on");
        assert_eq!(st.size(), split as u64);
        assert!(
            !with_ext(&stem, "data").exists(),
            "its bytes are in part buffers"
        );
        assert!(arena.in_use() > 0);
        st.write(split as u64, &body[split..], meta).await.unwrap();
        let etag = st.upload(&meta(), None).await.unwrap();
        assert!(get(&fresh, "stream").await.unwrap() == body);
        assert!(
            etag.as_str().ends_with("-4\""),
            "one upload of 4 parts: {etag:?}"
        );
        drop(st);
        assert_eq!(data_files(dir.path()), 0);
        assert!(
            !with_ext(&stem, "meta").exists(),
            "nothing of it is left in the cache directory"
        );
    }

    /// The entry a successor's scan leaves for a stream whose upload `id` holds what S3 has of
    /// `[0, streamed)` and whose data file holds the tail `[streamed, streamed + tail.len())`
    /// (none of the parts below): what `take_over_parts` makes of a part being filled.
    fn stream_entry(ctx: &StageCtx, key: &str, id: &UploadId, streamed: u64, tail: &[u8]) -> Entry {
        let stem = ctx.cache.new_stem();
        let size = streamed + tail.len() as u64;
        let mut record = Record::new(ctx.bucket.as_str(), key);
        record.upload_id = Some(id.0.clone());
        record.part_size = ctx.stream_part_size();
        record.streamed = streamed;
        record.size = size;
        record.dirty = true;
        record.local = vec![(streamed, size)];
        let mut entry = Entry::new(stem.clone());
        entry.write_record(&record).unwrap();
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(with_ext(&stem, "data"))
            .unwrap();
        data.write_all_at(tail, streamed).unwrap();
        Entry::adopt(stem, data)
    }

    /// A stream that goes on after a death completes its upload from the parts S3 lists only
    /// when every part below its end is there: one missing is `EIO` (never a shorter object).
    /// And an upload that is gone when the flush comes, because the dead process completed it
    /// in a flush the kernel then sent again, is the object when that object has the file's
    /// size and part count.
    #[tokio::test]
    async fn a_continued_stream_completes_only_whole() {
        let (store, bucket) = mem_bucket().await;
        let dir = crate::cache_dir::private_tempdir();
        let arena = arena();
        let ctx = ctx_with(store.clone(), bucket.clone(), dir.path(), Some(arena));
        let part = 5u64 << 20;
        let body: Vec<u8> = (0..2 * part + 1000).map(|i| (i % 253) as u8).collect();
        let (parts, tail) = body.split_at(2 * part as usize);
        let record_of = |entry: &Entry| {
            Record::parse(&std::fs::read_to_string(entry.with_ext("meta")).unwrap()).unwrap()
        };

        // Part 1 is nowhere: neither in the upload nor in the data file.
        let id = store
            .create_multipart_upload(&bucket, "gap", &PutOptions::default())
            .await
            .unwrap();
        store
            .upload_part(
                &bucket,
                "gap",
                &id,
                2,
                Bytes::copy_from_slice(&parts[part as usize..]),
            )
            .await
            .unwrap();
        let entry = stream_entry(&ctx, "gap", &id, 2 * part, tail);
        let record = record_of(&entry);
        let mut st = Staged::continued(ctx.clone(), entry, &record)
            .await
            .unwrap();
        let err = st.upload(&meta(), None).await.unwrap_err();
        assert_eq!(err.errno, libc::EIO, "{err:?}");
        assert!(get(&ctx, "gap").await.is_none(), "no shorter object");
        st.discard().await;

        // The dead process completed the upload (its flush was sent again).
        let id = store
            .create_multipart_upload(&bucket, "done", &PutOptions::default())
            .await
            .unwrap();
        let mut done = Vec::new();
        for (n, chunk) in body.chunks(part as usize).enumerate() {
            let p = store
                .upload_part(
                    &bucket,
                    "done",
                    &id,
                    n as i32 + 1,
                    Bytes::copy_from_slice(chunk),
                )
                .await
                .unwrap();
            done.push(p);
        }
        let entry = stream_entry(&ctx, "done", &id, 2 * part, tail);
        store
            .complete_multipart_upload(&bucket, "done", &id, &done)
            .await
            .unwrap();
        let record = record_of(&entry);
        let mut st = Staged::continued(ctx.clone(), entry, &record)
            .await
            .unwrap();
        st.upload(&meta(), None).await.unwrap();
        assert!(get(&ctx, "done").await.unwrap() == body);
    }

    /// A staging file still open for writing is left to its handles only when the object is
    /// still the version it started from. One whose process uploaded it and died before its
    /// record said so is the object already (dropped, and the handles go on from the object);
    /// one whose object another client replaced is kept as a conflict. Neither is handed to
    /// the handles, whose next upload would fail on the version it expects.
    #[tokio::test]
    async fn a_staging_file_still_open_is_left_to_its_handles_only_over_its_own_version() {
        let store = Arc::new(MemStore::new());
        let dir = crate::cache_dir::private_tempdir();
        let dead = ctx(&store, dir.path()).await;
        let old: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        for key in ["mine", "landed", "theirs"] {
            let base = put(&dead, key, &old).await;
            let mut st = Staged::from_object(dead.clone(), key, base).unwrap();
            st.write(old.len() as u64, b" appended", meta)
                .await
                .unwrap();
            if key == "landed" {
                // Uploaded, and the process died before it rewrote the record.
                let meta_path = st.path().with_extension("meta");
                let before = std::fs::read(&meta_path).unwrap();
                st.upload(&meta(), None).await.unwrap();
                std::fs::write(&meta_path, before).unwrap();
            }
            std::mem::forget(st);
        }
        put(&dead, "theirs", b"another client's").await;
        dead.cache.unlock_as_if_dead();
        let fresh = ctx(&store, dir.path()).await;
        let writing: HashSet<String> = ["mine", "landed", "theirs"].map(str::to_owned).into();
        let report = scan(&fresh, &writing).await;
        let deferred: Vec<&str> = report.deferred.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(deferred, ["mine"], "{report:?}");
        assert_eq!((report.dropped, report.kept, report.uploaded), (1, 1, 0));
        assert!(get(&fresh, "mine").await.unwrap() == old, "not uploaded");
    }

    #[tokio::test]
    async fn a_file_whose_multipart_upload_completed_unanswered_is_known_by_its_etag() {
        let (store, bucket) = mem_bucket().await;
        completed_unanswered(store, bucket).await;
    }

    /// The same against the S3 server of the tests (its multipart ETags, not ours).
    #[tokio::test]
    async fn a_file_whose_multipart_upload_completed_unanswered_is_known_on_the_test_server() {
        let store: Arc<dyn ObjectStore> =
            Arc::new(s3vol_s3::AwsStore::new(&s3vol_s3::testing::config()).await);
        let bucket = s3vol_s3::testing::unique_bucket("recover-mpu");
        store.create_bucket(&bucket).await.unwrap();
        completed_unanswered(store, bucket).await;
    }

    /// The scan of a mount that starts once `dead`'s process is gone, on the same directory.
    async fn successor_scan(
        dead: &StageCtx,
        store: Arc<dyn ObjectStore>,
        bucket: BucketName,
        dir: &Path,
    ) -> (Arc<StageCtx>, ScanReport) {
        dead.cache.unlock_as_if_dead();
        let fresh = ctx_on(store, bucket, dir);
        let report = scan(&fresh, &HashSet::new()).await;
        (fresh, report)
    }

    async fn completed_unanswered(store: Arc<dyn ObjectStore>, bucket: BucketName) {
        let dir = crate::cache_dir::private_tempdir();
        let dead = ctx_on(store.clone(), bucket.clone(), dir.path());
        let old: Vec<u8> = vec![7u8; 12 << 20];
        let new: Vec<u8> = (0..12u32 << 20).map(|i| (i / 3) as u8).collect();
        // A file rewritten whole, then uploaded in parts: S3 completed the upload, and the
        // process died before it read the answer (its record still says dirty, from `old`).
        let base = put(&dead, "big", &old).await;
        let mut st = Staged::from_object(dead.clone(), "big", base).unwrap();
        st.write(0, &new, meta).await.unwrap();
        std::mem::forget(st);
        let part = crate::stage::upload_part_size(&dead, new.len() as u64) as usize;
        let id = store
            .create_multipart_upload(&dead.bucket, "big", &PutOptions::default())
            .await
            .unwrap();
        let mut parts = Vec::new();
        for (i, chunk) in new.chunks(part).enumerate() {
            let n = i as i32 + 1;
            let body = Bytes::copy_from_slice(chunk);
            parts.push(
                store
                    .upload_part(&dead.bucket, "big", &id, n, body)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(parts.len(), 3);
        let done = store
            .complete_multipart_upload(&dead.bucket, "big", &id, &parts)
            .await
            .unwrap();
        assert!(
            done.etag.as_str().ends_with("-3\""),
            "{}",
            done.etag.as_str()
        );
        // A file whose object another client replaced with other bytes of the same size.
        let base = put(&dead, "other", &old).await;
        let mut st = Staged::from_object(dead.clone(), "other", base).unwrap();
        st.write(0, &new, meta).await.unwrap();
        std::mem::forget(st);
        let mut theirs = new.clone();
        theirs[5] ^= 1;
        put(&dead, "other", &theirs).await;
        let (fresh, report) = successor_scan(&dead, store, bucket, dir.path()).await;
        assert_eq!(
            (report.dropped, report.uploaded, report.kept),
            (1, 0, 1),
            "{report:?}"
        );
        assert!(get(&fresh, "big").await.unwrap() == new);
        assert!(get(&fresh, "other").await.unwrap() == theirs);
        assert_eq!(data_files(dir.path()), 1, "only the changed one is kept");
    }

    /// A staging file patched in place (the rest of the old version never fetched: holes in
    /// the data file) whose own multipart upload S3 completed before the process could record
    /// it: the data file cannot prove the object byte for byte, the upload ID does.
    #[tokio::test]
    async fn a_sparse_staging_file_whose_own_upload_completed_is_known_by_its_upload_id() {
        let (store, bucket) = mem_bucket().await;
        let dir = crate::cache_dir::private_tempdir();
        let dead = ctx_on(store.clone(), bucket.clone(), dir.path());
        let old: Vec<u8> = (0..20u32 << 20).map(|i| (i % 239) as u8).collect();
        let mut new = old.clone();
        new[13 << 20..(13 << 20) + 5].copy_from_slice(b"patch");
        // `landed`: the process's upload completed; `open`: its upload is still open, and
        // another client replaced the object meanwhile.
        for (key, complete) in [("landed", true), ("open", false)] {
            let base = put(&dead, key, &old).await;
            let mut st = Staged::from_object(dead.clone(), key, base).unwrap();
            st.write(13 << 20, b"patch", meta).await.unwrap();
            let meta_path = st.path().with_extension("meta");
            std::mem::forget(st);
            let id = store
                .create_multipart_upload(&dead.bucket, key, &PutOptions::default())
                .await
                .unwrap();
            record_upload(&meta_path, &id);
            if complete {
                let part = store
                    .upload_part(&dead.bucket, key, &id, 1, Bytes::from(new.clone()))
                    .await
                    .unwrap();
                store
                    .complete_multipart_upload(&dead.bucket, key, &id, &[part])
                    .await
                    .unwrap();
            } else {
                let mut theirs = new.clone();
                theirs[0] ^= 1;
                put(&dead, key, &theirs).await;
            }
        }
        let (fresh, report) = successor_scan(&dead, store, bucket, dir.path()).await;
        assert_eq!(
            (report.dropped, report.uploaded, report.kept),
            (1, 0, 1),
            "{report:?}"
        );
        assert!(get(&fresh, "landed").await.unwrap() == new);
        assert_eq!(report.kept_files.len(), 1);
        assert!(report.kept_files[0].1 == "open");
    }

    /// A staging file whose process died while S3 was still carrying out the completion of
    /// its multipart upload: the scan's HEAD finds the version the file started from, and the
    /// completion lands between that HEAD and the scan's abort of the upload. The file is the
    /// object then: dropped, neither uploaded again (which would fail on its version) nor kept,
    /// whether an application still has it open for writing or not.
    /// Writes into the journal record at `meta_path` that its file's upload `id` started, as
    /// the process does before it creates the upload's first part.
    fn record_upload(meta_path: &Path, id: &UploadId) {
        let mut record = Record::parse(&std::fs::read_to_string(meta_path).unwrap()).unwrap();
        record.upload_id = Some(id.0.clone());
        let mut body = serde_json::to_vec(&record).unwrap();
        body.push(b'\n');
        std::fs::write(meta_path, body).unwrap();
    }

    #[tokio::test]
    async fn a_completion_landing_after_the_scans_head_leaves_the_object_as_the_file() {
        for still_open in [false, true] {
            completion_after_the_head(still_open).await;
        }
    }

    async fn completion_after_the_head(still_open: bool) {
        let (mem, bucket) = mem_bucket().await;
        let faults = Arc::new(s3vol_s3::FaultStore::new(mem.clone()));
        let dir = crate::cache_dir::private_tempdir();
        let dead = ctx_on(mem.clone(), bucket.clone(), dir.path());
        let old: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let mut new = old.clone();
        new.extend_from_slice(b" appended");
        let base = put(&dead, "f", &old).await;
        let mut st = Staged::from_object(dead.clone(), "f", base).unwrap();
        st.write(old.len() as u64, b" appended", meta)
            .await
            .unwrap();
        let meta_path = st.path().with_extension("meta");
        std::mem::forget(st);
        // The upload its process started and sent every part of, recorded as it started.
        let id = mem
            .create_multipart_upload(&bucket, "f", &PutOptions::default())
            .await
            .unwrap();
        let part = mem
            .upload_part(&bucket, "f", &id, 1, Bytes::from(new.clone()))
            .await
            .unwrap();
        record_upload(&meta_path, &id);
        // Its completion, which S3 carries out only as the scan aborts the upload.
        let (store, b) = (mem.clone(), bucket.clone());
        faults.add(s3vol_s3::Fault::Before {
            op: s3vol_s3::Op::AbortMultipart,
            action: s3vol_s3::Action::new(move || {
                let (store, b, id, part) = (store.clone(), b.clone(), id.clone(), part.clone());
                async move {
                    store
                        .complete_multipart_upload(&b, "f", &id, &[part])
                        .await
                        .unwrap();
                }
            }),
        });
        dead.cache.unlock_as_if_dead();
        let fresh = ctx_on(faults.clone(), bucket, dir.path());
        let writing: HashSet<String> = if still_open {
            ["f".to_owned()].into()
        } else {
            HashSet::new()
        };
        let report = scan(&fresh, &writing).await;
        assert_eq!(
            (report.dropped, report.uploaded, report.kept),
            (1, 0, 0),
            "still open: {still_open}: {report:?}"
        );
        assert!(report.deferred.is_empty(), "{report:?}");
        assert!(get(&fresh, "f").await.unwrap() == new);
        assert_eq!(data_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_stream_written_out_at_exit_is_completed_from_its_parts_and_the_data_file() {
        let dir = crate::cache_dir::private_tempdir();
        let store = Arc::new(MemStore::new());
        let dead = ctx(&store, dir.path()).await;
        let content: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut st = Staged::new_empty(dead.clone(), "s", None).unwrap();
        for c in content.chunks(1 << 20) {
            let at = st.size();
            st.write(at, c, meta).await.unwrap();
        }
        // Wait for the parts in flight, as an orderly exit does.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        st.keep_stream_bytes().unwrap();
        std::mem::forget(st);
        dead.cache.unlock_as_if_dead();

        let fresh = ctx(&store, dir.path()).await;
        let report = scan(&fresh, &HashSet::new()).await;
        assert_eq!((report.uploaded, report.kept), (1, 0), "{report:?}");
        assert!(get(&fresh, "s").await.unwrap() == content);
        assert_eq!(data_files(dir.path()), 0);
    }
}
