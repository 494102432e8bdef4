//! Pre-copy: the application's memory sent while it runs, in rounds, so
//! that the freeze has only what was written since the last round to send.
//!
//! Both processes that write application memory are watched: the
//! application process and its proxy (every `read` lands in application
//! memory through the proxy's mapping), each through the userfaultfd it
//! made at start (`Header::app_uffd`, `proxy_uffd`), taken here with
//! pidfd_getfd, and their dirty sets joined (`dirty`).
//!
//! Memory goes by virtual address, in `Memory` records each preceded by a
//! `MemoryMap` record saying which memory file and offset every mapped
//! range of LWK memory is at that moment (the destination writes the bytes
//! straight into its memory files). A round reads /proc/PID/maps again: a
//! range mapped since (or mapped anew at the same place) is tracked from
//! then on and sent whole; so is a range the proxy mapped since (its writes
//! before the tracking are unseen otherwise).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use crate::app::App;
use crate::dirty::{DirtySet, PageSize, WriteTracker};
use crate::image::{ImageWriter, RecordKind};

/// A range of LWK memory and where it is: memory file `slot` (4 KiB pages,
/// 2 MiB pages, shared) of process `member` of the tree at `offset`.
/// `member` is the first process that has the file: the shared memory
/// file of a process and the one that forked it is one file, and its
/// bytes go there whichever process's map they were read through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MappedRange {
    pub start: u64,
    pub end: u64,
    pub slot: usize,
    pub offset: u64,
    #[serde(default)]
    pub member: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PreCopyError {
    #[error("process {0} has no userfaultfd for pre-copy (made without CAP_SYS_PTRACE?)")]
    NoUserfaultfd(i32),
    #[error("{0}")]
    Dirty(#[from] crate::dirty::DirtyError),
    #[error("cannot read {what} of process {pid}: {source}")]
    Proc { pid: i32, what: String, source: std::io::Error },
    #[error("sending memory: {0}")]
    Image(#[from] crate::image::ImageError),
}

type Result<T> = std::result::Result<T, PreCopyError>;

/// What one round sent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Round {
    /// Bytes of memory sent (before compression).
    pub bytes: u64,
    /// Of which written since the previous round (0 in the first).
    pub dirty_bytes: u64,
    pub ms: f64,
}

/// Pre-copy of every process of an application's tree (`tree`): each
/// round goes through them in order, each process's memory after a
/// `MemoryMap` record of its own.
pub struct PreCopy<'a> {
    members: Vec<Tracked<'a>>,
}

impl<'a> PreCopy<'a> {
    /// Watch the memory of the processes `apps` (the tree's, in order).
    pub fn start(apps: &[&'a App]) -> Result<PreCopy<'a>> {
        let mut members: Vec<Tracked> = Vec::with_capacity(apps.len());
        for app in apps {
            members.push(Tracked::start(app)?);
        }
        let mut p = PreCopy { members };
        p.assign_owners();
        Ok(p)
    }

    /// The memory files as the processes have them now, each the first
    /// process's that has it (a process's files change at an exec).
    fn refresh(&mut self) -> Result<()> {
        for m in &mut self.members {
            m.refresh_files()?;
        }
        self.assign_owners();
        Ok(())
    }

    /// A memory file an earlier process has too is that one's.
    fn assign_owners(&mut self) {
        for i in 0..self.members.len() {
            for k in 0..3 {
                let Some(id) = self.members[i].file_ids[k] else { continue };
                self.members[i].owners[k] = self.members.iter().position(|m| m.file_ids[k] == Some(id)).unwrap_or(i);
            }
        }
    }

    /// One round of every process: what to send, sent to `out`.
    pub fn round<W: Write>(&mut self, out: &mut ImageWriter<W>) -> Result<Round> {
        let t = Instant::now();
        self.refresh()?;
        let mut total = Round::default();
        for m in &mut self.members {
            let r = m.round(out)?;
            total.bytes += r.bytes;
            total.dirty_bytes += r.dirty_bytes;
        }
        total.ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(total)
    }

    /// After the freeze: for each process, the ranges the final image
    /// must still carry (written since the last round, or mapped since),
    /// without sending them.
    pub fn remaining(&mut self) -> Result<Vec<Vec<Range<u64>>>> {
        self.refresh()?;
        self.members.iter_mut().map(|m| m.remaining()).collect()
    }
}

/// One process watched.
struct Tracked<'a> {
    pid: i32,
    process: &'a App,
    /// Each memory file's identity (device, inode), and the process of the
    /// tree whose file it is (see [`MappedRange::member`]). The LWK may
    /// make new ones as it runs (its 2 MiB pages' when it first uses them,
    /// new ones at an exec): looked at again every round.
    file_ids: [Option<(u64, u64)>; 3],
    owners: [usize; 3],
    files: [Option<File>; 3],
    app: WriteTracker,
    proxy: WriteTracker,
    /// The ranges tracked in the application process, by start.
    map: BTreeMap<u64, MappedRange>,
    /// Of those, the ones the proxy has mapped and is tracked in.
    in_proxy: BTreeMap<u64, MappedRange>,
    rounds: usize,
}

fn page_size(slot: usize) -> PageSize {
    if slot == 1 {
        PageSize::HUGE_2M
    } else {
        PageSize::BASE
    }
}

/// The LWK memory ranges of process `pid`, from /proc/PID/maps: the
/// mappings of the memory files `files` (device and inode of each slot's),
/// whatever their names (a memfd, or a file of a partition's memory
/// directory).
fn lwk_ranges(pid: i32, files: &[Option<(u64, u64)>; 3]) -> Result<Vec<MappedRange>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| PreCopyError::Proc {
        pid,
        what: "the memory map".into(),
        source,
    })?;
    Ok(maps
        .lines()
        .filter_map(|l| {
            // start-end perms offset major:minor inode [path]
            let f: Vec<&str> = l.split_whitespace().collect();
            let (major, minor) = f.get(3)?.split_once(':')?;
            let dev = libc::makedev(u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?);
            let inode: u64 = f.get(4)?.parse().ok()?;
            let slot = files.iter().position(|id| *id == Some((dev, inode)))?;
            let (s, e) = f[0].split_once('-')?;
            Some(MappedRange {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                slot,
                offset: u64::from_str_radix(f[2], 16).ok()?,
                member: 0,
            })
        })
        .collect())
}

/// `ranges` with neighbours that continue each other (the same memory
/// file, the offset going on) joined, by start.
fn runs(mut ranges: Vec<MappedRange>) -> BTreeMap<u64, MappedRange> {
    ranges.sort_by_key(|r| r.start);
    let mut out: BTreeMap<u64, MappedRange> = BTreeMap::new();
    let mut last: Option<MappedRange> = None;
    for r in ranges {
        match &mut last {
            Some(l) if l.end == r.start && l.slot == r.slot && l.offset + (l.end - l.start) == r.offset => {
                l.end = r.end
            }
            _ => {
                if let Some(l) = last.replace(r) {
                    out.insert(l.start, l);
                }
            }
        }
    }
    if let Some(l) = last {
        out.insert(l.start, l);
    }
    out
}

/// Does one of `runs` map all of `r`, the same memory file at the same
/// offsets?
fn covers(runs: &BTreeMap<u64, MappedRange>, r: &MappedRange) -> bool {
    runs.range(..=r.start).next_back().is_some_and(|(_, run)| {
        run.slot == r.slot && run.end >= r.end && run.offset + (r.start - run.start) == r.offset
    })
}

impl<'a> Tracked<'a> {
    /// Watch `app`'s memory (and its proxy's writes into it).
    fn start(app: &'a App) -> Result<Tracked<'a>> {
        use std::sync::atomic::Ordering::SeqCst;
        let h = &app.control().header;
        let (a, p, ptid) = (h.app_uffd.load(SeqCst), h.proxy_uffd.load(SeqCst), h.proxy_uffd_tid.load(SeqCst));
        if a <= 0 {
            return Err(PreCopyError::NoUserfaultfd(app.pid));
        }
        let proxy_pid = app.proxy_pid();
        if p <= 0 || ptid <= 0 {
            return Err(PreCopyError::NoUserfaultfd(proxy_pid));
        }
        let app_uffd = crate::dirty::take_userfaultfd(app.pid, a - 1)?;
        // The proxy thread's tid as this process sees it: the thread of the
        // proxy whose id in its namespace is ptid.
        let host_tid = std::fs::read_dir(format!("/proc/{proxy_pid}/task"))
            .ok()
            .and_then(|d| {
                d.flatten()
                    .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
                    .find(|&t| crate::app::pid_in_namespace_of_task(proxy_pid, t) == Some(ptid))
            })
            .unwrap_or(ptid);
        let proxy_uffd = crate::dirty::take_userfaultfd_of_thread(host_tid, p - 1)?;
        // Each userfaultfd takes one handshake in its life: a migration
        // after one that rolled back finds it made (see the header).
        let tracker = |ready: &std::sync::atomic::AtomicI32, value: i32, pid: i32, uffd| {
            let t = match ready.load(SeqCst) == value {
                true => WriteTracker::for_process_again(pid, uffd),
                false => WriteTracker::for_process(pid, uffd),
            }?;
            ready.store(value, SeqCst);
            Ok::<_, PreCopyError>(t)
        };
        let app_tracker = tracker(&h.app_uffd_ready, a, app.pid, app_uffd)?;
        let proxy_tracker = tracker(&h.proxy_uffd_ready, p, proxy_pid, proxy_uffd)?;
        let mut t = Tracked {
            pid: app.pid,
            process: app,
            file_ids: [None; 3],
            // PreCopy::assign_owners says whose they are.
            owners: [0; 3],
            files: [None, None, None],
            app: app_tracker,
            proxy: proxy_tracker,
            map: BTreeMap::new(),
            in_proxy: BTreeMap::new(),
            rounds: 0,
        };
        t.refresh_files()?;
        Ok(t)
    }

    /// The memory files the control region names now, opened again where
    /// one is new (whose they are is `PreCopy::assign_owners`'s to say).
    fn refresh_files(&mut self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        use std::sync::atomic::Ordering::SeqCst;
        let h = &self.process.control().header;
        for k in 0..3 {
            let fd = h.memfd[k].load(SeqCst);
            if fd < 0 {
                continue;
            }
            let path = format!("/proc/{}/fd/{fd}", self.pid);
            let proc_error = |source| PreCopyError::Proc { pid: self.pid, what: format!("memory file {fd}"), source };
            let meta = std::fs::metadata(&path).map_err(proc_error)?;
            let id = (meta.dev(), meta.ino());
            if self.file_ids[k] != Some(id) {
                self.files[k] = Some(File::open(&path).map_err(proc_error)?);
                self.file_ids[k] = Some(id);
            }
        }
        Ok(())
    }

    /// Bring the tracked ranges up to date with both processes' maps; the
    /// ranges to send whole go into `whole`.
    fn reconcile(&mut self, whole: &mut Vec<MappedRange>) -> Result<()> {
        self.refresh_files()?;
        let now: BTreeMap<u64, MappedRange> =
            lwk_ranges(self.pid, &self.file_ids)?.into_iter().map(|r| (r.start, r)).collect();
        for (start, old) in std::mem::take(&mut self.map) {
            if now.get(&start) != Some(&old) {
                self.app.forget(old.start..old.end);
                if self.in_proxy.remove(&start).is_some() {
                    self.proxy.forget(old.start..old.end);
                }
            } else {
                self.map.insert(start, old);
            }
        }
        for (start, r) in &now {
            if !self.map.contains_key(start) {
                self.app.track(r.start..r.end, page_size(r.slot))?;
                self.map.insert(*start, *r);
                whole.push(*r);
            }
        }
        // The proxy maps what the application mapped at its next
        // delegated call: track it there once it has. Its map may cut the
        // same memory into other pieces than the application's (the kernel
        // merges neighbouring mappings differently in each process), so a
        // range counts as mapped there when the proxy's runs cover it.
        let proxy_now = runs(lwk_ranges(self.proxy.pid(), &self.file_ids)?);
        for (start, old) in std::mem::take(&mut self.in_proxy) {
            if covers(&proxy_now, &old) && self.map.get(&start) == Some(&old) {
                self.in_proxy.insert(start, old);
            } else {
                self.proxy.forget(old.start..old.end);
            }
        }
        for (start, r) in &self.map {
            if !self.in_proxy.contains_key(start) && covers(&proxy_now, r) {
                self.proxy.track(r.start..r.end, page_size(r.slot))?;
                self.in_proxy.insert(*start, *r);
                if !whole.contains(r) {
                    whole.push(*r);
                }
            }
        }
        Ok(())
    }

    /// The ranges to send in this round: everything the first time, then
    /// what was written since (and what was mapped since).
    fn collect(&mut self) -> Result<(Vec<Range<u64>>, u64)> {
        let mut whole = Vec::new();
        self.reconcile(&mut whole)?;
        let mut dirty = DirtySet::new();
        let mut proxy_dirty = DirtySet::new();
        self.app.scan_and_reprotect(&mut dirty)?;
        self.proxy.scan_and_reprotect(&mut proxy_dirty)?;
        dirty.join(&proxy_dirty);
        let dirty_bytes = if self.rounds == 0 { 0 } else { dirty.bytes() };
        let mut send: Vec<Range<u64>> = dirty.ranges().map(|r| r.start..r.end).collect();
        if self.rounds == 0 {
            send = self.map.values().map(|r| r.start..r.end).collect();
        } else {
            send.extend(whole.iter().map(|r| r.start..r.end));
        }
        send.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in send {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Ok((merged, dirty_bytes))
    }

    /// One round: what to send, sent to `out`.
    fn round<W: Write>(&mut self, out: &mut ImageWriter<W>) -> Result<Round> {
        let t = Instant::now();
        let first = self.rounds == 0;
        let (ranges, dirty_bytes) = self.collect()?;
        let map: Vec<MappedRange> =
            self.map.values().map(|r| MappedRange { member: self.owners[r.slot], ..*r }).collect();
        out.json(RecordKind::MemoryMap, &map)?;
        let mut bytes = 0;
        for r in &ranges {
            bytes += self.send_range(out, r.clone(), first)?;
        }
        self.rounds += 1;
        Ok(Round { bytes, dirty_bytes, ms: t.elapsed().as_secs_f64() * 1e3 })
    }

    /// After the freeze: the ranges the final image must still carry
    /// (written since the last round, or mapped since), without sending
    /// them.
    fn remaining(&mut self) -> Result<Vec<Range<u64>>> {
        Ok(self.collect()?.0)
    }

    /// Send the memory of [range) (within tracked ranges): only the extents
    /// that hold data when `sparse` (the first round).
    fn send_range<W: Write>(&self, out: &mut ImageWriter<W>, range: Range<u64>, sparse: bool) -> Result<u64> {
        let mut sent = 0;
        for r in self.map.values() {
            let (s, e) = (range.start.max(r.start), range.end.min(r.end));
            if s >= e {
                continue;
            }
            let Some(file) = &self.files[r.slot] else { continue };
            let off = r.offset + (s - r.start);
            let extents = if sparse { crate::checkpoint::data_extents(file, off, e - s) } else { vec![(off, e - s)] };
            let mut buf = vec![0u8; crate::image::MEMORY_CHUNK_LEN];
            for (o, len) in extents {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], o + done).map_err(|source| PreCopyError::Proc {
                        pid: self.pid,
                        what: "its memory".into(),
                        source,
                    })?;
                    out.memory(r.start + (o + done - r.offset), &buf[..n])?;
                    done += n as u64;
                    sent += n as u64;
                }
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64, slot: usize, offset: u64) -> MappedRange {
        MappedRange { start, end, slot, offset, member: 0 }
    }

    #[test]
    fn a_range_the_proxy_maps_in_two_pieces_is_covered_there() {
        // As seen: the application has one mapping where its proxy has two.
        let proxy = runs(vec![r(0x3000, 0x10000, 0, 0x80e000), r(0x1000, 0x3000, 0, 0x80c000)]);
        assert_eq!(proxy.len(), 1, "{proxy:?}");
        assert!(covers(&proxy, &r(0x1000, 0x10000, 0, 0x80c000)));
        assert!(covers(&proxy, &r(0x2000, 0x4000, 0, 0x80d000)), "a part of a run");
    }

    #[test]
    fn a_range_mapped_otherwise_or_only_in_part_is_not_covered() {
        let proxy =
            runs(vec![r(0x1000, 0x3000, 0, 0x10000), r(0x3000, 0x5000, 0, 0x90000), r(0x5000, 0x6000, 2, 0x12000)]);
        assert_eq!(proxy.len(), 3, "offsets or files that do not go on are not joined");
        assert!(!covers(&proxy, &r(0x1000, 0x5000, 0, 0x10000)), "the offsets jump at 0x3000");
        assert!(!covers(&proxy, &r(0x5000, 0x6000, 0, 0x12000)), "another memory file");
        assert!(!covers(&proxy, &r(0x5000, 0x7000, 2, 0x12000)), "beyond the end");
        assert!(!covers(&proxy, &r(0x0, 0x1000, 0, 0xf000)), "before the first");
    }
}
