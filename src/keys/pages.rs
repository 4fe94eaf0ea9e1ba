//! Memory for the key table's two big arrays, the index slots and the entry slab
//! (`keys::compact`): anonymous mappings, advised for transparent huge pages once they span
//! one.
//!
//! Why: at a million keys a lookup reads an index slot and then a cell, at random in ~100 MB.
//! On 4 KiB pages each of those reads is a TLB miss as well as a cache miss, and on a VM
//! the page walk is nested; on 2 MiB pages the table's ~50 pages stay in the TLB. The
//! allocator would hand out these arrays on 4 KiB pages wherever transparent huge pages are
//! `madvise`-only (the default of Ubuntu and others), and turning them on for the whole
//! allocator (jemalloc's `thp:always`) costs every small allocation: +30 MB at start and
//! +50% per idle connection, measured. So only these arrays ask, through `madvise`.
//!
//! The kernel zero-fills a mapping on first touch, so a page no one has written costs no
//! memory: a chunk's unused tail, or the empty slots of an index, stay unallocated.
//! Small arrays are not advised (an index below `HUGE_PAGE`, the slab's first chunk): they
//! fit the TLB as they are, and a huge page would make a ten-key table cost 2 MiB.
//!
//! No `unsafe` here: memmap2 maps and advises, zerocopy views the bytes as atomics (it checks
//! size and alignment), self_cell keeps that view beside the mapping it borrows.

use memmap2::{Advice, MmapMut};
use self_cell::{self_cell, MutBorrow};
use std::alloc::{handle_alloc_error, Layout};
use std::sync::atomic::AtomicU64;
use zerocopy::{FromBytes, IntoBytes, KnownLayout};

/// A transparent huge page (x86-64 and arm64 with 4 KiB base pages).
pub const HUGE_PAGE: usize = 2 << 20;

type SlotSlice<'a> = &'a [AtomicU64];

self_cell!(
    /// Zeroed atomic words in their own mapping (an index's slots).
    pub struct Slots {
        owner: MutBorrow<MmapMut>,
        #[covariant]
        dependent: SlotSlice,
    }
);

type CellSlice<'a> = &'a [crate::keys::compact::Cell];

self_cell!(
    /// Zeroed slab cells in their own mapping (a chunk of the entry slab).
    pub struct CellPage {
        owner: MutBorrow<MmapMut>,
        #[covariant]
        dependent: CellSlice,
    }
);

/// `n` zeroed words, on huge pages when they span one.
pub fn slots(n: usize) -> Slots {
    let bytes = bytes::<AtomicU64>(n);
    let huge = bytes >= HUGE_PAGE;
    Slots::new(MutBorrow::new(map(bytes, huge)), |m| {
        view(m.borrow_mut(), n, huge)
    })
}

/// `n` zeroed cells, on huge pages when `huge`.
pub fn cells(n: usize, huge: bool) -> CellPage {
    let map = map(bytes::<crate::keys::compact::Cell>(n), huge);
    CellPage::new(MutBorrow::new(map), |m| view(m.borrow_mut(), n, huge))
}

fn bytes<T>(n: usize) -> usize {
    std::mem::size_of::<T>().saturating_mul(n).max(1)
}

impl std::ops::Deref for Slots {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        self.borrow_dependent()
    }
}

impl std::ops::Deref for CellPage {
    type Target = [crate::keys::compact::Cell];
    fn deref(&self) -> &[crate::keys::compact::Cell] {
        self.borrow_dependent()
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slots({})", self.len())
    }
}

impl std::fmt::Debug for CellPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CellPage({})", self.len())
    }
}

/// A zeroed mapping of `bytes`, advised for huge pages when `huge`. A huge one is mapped a
/// huge page longer, so that `view` can start it on a huge-page boundary and every page of
/// it can be huge (the slack is never touched: it costs address space, not memory). A
/// failed mapping is an allocation failure, handled as the allocator's are.
fn map(bytes: usize, huge: bool) -> MmapMut {
    let len = if huge {
        (bytes.div_ceil(HUGE_PAGE) + 1) * HUGE_PAGE
    } else {
        bytes
    };
    let Ok(map) = MmapMut::map_anon(len) else {
        handle_alloc_error(layout(len))
    };
    if huge {
        // Advice only: a kernel without transparent huge pages says no, and the table
        // works the same on small pages.
        let _ = map.advise(Advice::HugePage);
    }
    map
}

/// `n` values of `T` in `bytes` (a fresh mapping from `map`), from its first huge-page
/// boundary when `huge`. The mapping is page-aligned and long enough, so the view cannot
/// fail; if it did, it is handled as a failed allocation.
fn view<T: FromBytes + IntoBytes + KnownLayout>(bytes: &mut [u8], n: usize, huge: bool) -> &[T] {
    let len = bytes.len();
    let skip = if huge {
        (HUGE_PAGE - bytes.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE
    } else {
        0
    };
    let bytes = bytes.get_mut(skip..).unwrap_or_default();
    match <[T]>::mut_from_prefix_with_elems(bytes, n) {
        Ok((values, _)) => values,
        Err(_) => handle_alloc_error(layout(len)),
    }
}

fn layout(len: usize) -> Layout {
    Layout::from_size_align(len, 4096).unwrap_or(Layout::new::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn arrays_start_zeroed_and_hold_what_is_stored() {
        for n in [1, 64, 1000, HUGE_PAGE / 8 + 3] {
            let s = slots(n);
            assert_eq!(s.len(), n);
            assert!(s.iter().all(|w| w.load(Ordering::Relaxed) == 0));
            s[n - 1].store(7, Ordering::Relaxed);
            assert_eq!(s[n - 1].load(Ordering::Relaxed), 7);
        }
        for huge in [false, true] {
            let c = cells(crate::keys::compact::SLAB_CHUNK, huge);
            assert_eq!(c.len(), crate::keys::compact::SLAB_CHUNK);
            assert!(
                c.iter().all(|c| c.read().is_none()),
                "no cell starts written"
            );
        }
    }

    /// The kernel's flags on the mapping holding `addr` (`VmFlags` in /proc/self/smaps:
    /// `hg` is "advised for huge pages").
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn big_arrays_and_later_slab_chunks_are_advised_for_huge_pages_small_ones_not() {
        let huge = |flags: String| flags.split(' ').any(|f| f == "hg");
        let index = slots(HUGE_PAGE / 8 * 3);
        assert!(huge(vm_flags(index.as_ptr() as usize)), "a 6 MiB index");
        let small = slots(1000);
        assert!(!huge(vm_flags(small.as_ptr() as usize)), "an 8 KB index");
        let n = crate::keys::compact::SLAB_CHUNK;
        let first = cells(n, false);
        assert!(!huge(vm_flags(first.as_ptr() as usize)), "the first chunk");
        let later = cells(n, true);
        assert!(huge(vm_flags(later.as_ptr() as usize)), "a later chunk");
        // Whole huge pages: placed on a boundary, so all of it can be huge.
        assert_eq!(index.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(later.as_ptr() as usize % HUGE_PAGE, 0);
    }
}
