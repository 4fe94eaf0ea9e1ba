//! A hierarchical timing wheel: the store behind a worker's deadlines (`deadline::Wheel`).
//!
//! Nearly every deadline the data plane arms is cancelled long before it fires (an upstream
//! answers in microseconds against a 30 s response timeout), so arming and cancelling must be
//! cheap: here both are O(1), a few array writes. An ordered map paid a search and a
//! rebalance for each (~500 instructions an insert and as many a remove, callgrind, with a
//! few dozen entries; more with thousands of idle connections).
//!
//! Seven levels of 64 slots, each slot a list of entries: level `k`'s slots are 64^k ms
//! wide, so the levels span 2^42 ms. An entry sits in the level of the highest 6-bit group
//! in which its millisecond differs from `elapsed` (the last millisecond processed), in the
//! slot its millisecond names there. `advance` takes the earliest occupied slot while it has
//! begun: a level-0 slot's entries are due, a higher slot's are due or filed again relative
//! to the slot's start, which puts them in a lower level (each entry moves at most once per
//! level, and only if it lives that long). Each level keeps a bitmap of its occupied slots,
//! so the earliest is found with one `trailing_zeros` per level.
//!
//! Entries live in a slab whose free cells are reused; a key names a cell and the
//! generation it was filled in, so a key whose entry fired or was removed finds nothing, even
//! after its cell holds another entry. Single-threaded (a worker's own): no atomics.

use std::task::Waker;

const LEVELS: usize = 7;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// No entry (list ends, free list end).
const NIL: u32 = u32::MAX;
/// The last millisecond the levels reach (2^42 ms: 139 years of a worker's life): a later one
/// is placed there. Every tick shares the top level's one window, so no slot wraps around.
pub const MAX_TICK: u64 = (1 << (SLOT_BITS * LEVELS as u32)) - 1;

/// One entry's handle: its slab cell and the generation it was filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    cell: u32,
    generation: u32,
}

#[derive(Debug)]
struct Node {
    /// The millisecond the entry is due at.
    tick: u64,
    /// `Some` while the entry is in the wheel.
    waker: Option<Waker>,
    generation: u32,
    /// Where it is listed (level, slot) and its neighbours there; `next` also links the
    /// free list.
    level: u8,
    slot: u8,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
pub struct TimerWheel {
    nodes: Vec<Node>,
    free: u32,
    heads: [[u32; SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    /// The last millisecond processed: every entry is placed at or after it (one due at it
    /// already, or before, in its slot: the next `advance` takes it).
    elapsed: u64,
    len: usize,
}

impl Default for TimerWheel {
    fn default() -> Self {
        TimerWheel {
            nodes: Vec::new(),
            free: NIL,
            heads: [[NIL; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            elapsed: 0,
            len: 0,
        }
    }
}

impl TimerWheel {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// File `waker` to be due at millisecond `tick` (one already past is due at the next
    /// `advance`).
    pub fn insert(&mut self, tick: u64, waker: Waker) -> Key {
        let cell = match self.free {
            NIL => {
                self.nodes.push(Node {
                    tick,
                    waker: None,
                    generation: 0,
                    level: 0,
                    slot: 0,
                    prev: NIL,
                    next: NIL,
                });
                (self.nodes.len() - 1) as u32
            }
            free => {
                self.free = self.nodes[free as usize].next;
                free
            }
        };
        let node = &mut self.nodes[cell as usize];
        node.tick = tick;
        node.waker = Some(waker);
        node.generation = node.generation.wrapping_add(1);
        let generation = node.generation;
        self.len += 1;
        self.place(cell);
        Key { cell, generation }
    }

    /// The waker filed under `key`, while its entry is in the wheel.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut Waker> {
        let node = self.nodes.get_mut(key.cell as usize)?;
        if node.generation != key.generation {
            return None;
        }
        node.waker.as_mut()
    }

    /// Take the entry out; `None` if it fired or was removed already.
    pub fn remove(&mut self, key: Key) -> Option<Waker> {
        self.get_mut(key)?;
        self.unlink(key.cell);
        self.release(key.cell)
    }

    /// The start of the earliest occupied slot: no entry is due before it (one may be due
    /// later, when the slot is a higher level's and its entries are filed again).
    pub fn next_expiration(&self) -> Option<u64> {
        self.earliest().map(|(_, _, start)| start)
    }

    /// Push the waker of every entry due at millisecond `now` onto `due`.
    pub fn advance(&mut self, now: u64, due: &mut Vec<Waker>) {
        while let Some((level, slot, start)) = self.earliest() {
            if start > now {
                break;
            }
            self.elapsed = self.elapsed.max(start);
            let mut cell = self.heads[level][slot];
            self.heads[level][slot] = NIL;
            self.occupied[level] &= !(1 << slot);
            while cell != NIL {
                let next = self.nodes[cell as usize].next;
                if self.nodes[cell as usize].tick <= now {
                    due.extend(self.release(cell));
                } else {
                    self.place(cell);
                }
                cell = next;
            }
        }
        self.elapsed = self.elapsed.max(now);
    }

    /// The earliest occupied slot: (level, slot, the millisecond it starts at).
    fn earliest(&self) -> Option<(usize, usize, u64)> {
        let mut best: Option<(usize, usize, u64)> = None;
        for level in 0..LEVELS {
            let shift = SLOT_BITS * level as u32;
            let position = ((self.elapsed >> shift) as usize) % SLOTS;
            let ahead = self.occupied[level] & (u64::MAX << position);
            if ahead == 0 {
                continue;
            }
            let slot = ahead.trailing_zeros() as usize;
            let window = self.elapsed & !((1u64 << (shift + SLOT_BITS)) - 1);
            let start = (window | ((slot as u64) << shift)).max(self.elapsed);
            // Ties go to the higher level: its entries are filed down before the slot runs.
            if best.is_none_or(|(_, _, b)| start <= b) {
                best = Some((level, slot, start));
            }
        }
        best
    }

    /// List `cell` in the level and slot its tick falls in, seen from `elapsed`.
    fn place(&mut self, cell: u32) {
        let tick = self.nodes[cell as usize].tick.clamp(self.elapsed, MAX_TICK);
        let differs = (tick ^ self.elapsed) | (SLOTS as u64 - 1);
        let level = ((63 - differs.leading_zeros()) / SLOT_BITS) as usize;
        let slot = ((tick >> (SLOT_BITS * level as u32)) as usize) % SLOTS;
        let head = self.heads[level][slot];
        if head != NIL {
            self.nodes[head as usize].prev = cell;
        }
        let node = &mut self.nodes[cell as usize];
        node.level = level as u8;
        node.slot = slot as u8;
        node.prev = NIL;
        node.next = head;
        self.heads[level][slot] = cell;
        self.occupied[level] |= 1 << slot;
    }

    fn unlink(&mut self, cell: u32) {
        let (prev, next, level, slot) = {
            let n = &self.nodes[cell as usize];
            (n.prev, n.next, n.level as usize, n.slot as usize)
        };
        match prev {
            NIL => self.heads[level][slot] = next,
            p => self.nodes[p as usize].next = next,
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        if self.heads[level][slot] == NIL {
            self.occupied[level] &= !(1 << slot);
        }
    }

    /// Empty `cell` (already unlinked) onto the free list; its waker.
    fn release(&mut self, cell: u32) -> Option<Waker> {
        let free = self.free;
        let node = &mut self.nodes[cell as usize];
        node.next = free;
        node.prev = NIL;
        self.free = cell;
        self.len -= 1;
        node.waker.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn waker() -> Waker {
        Waker::noop().clone()
    }

    /// Random inserts, removes and advances against an ordered map of what must be due.
    #[test]
    fn fires_exactly_what_an_ordered_map_says_is_due() {
        let mut wheel = TimerWheel::default();
        let mut model: BTreeMap<(u64, u32), Key> = BTreeMap::new();
        let mut now = 0u64;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut fired = 0;
        for step in 0..200_000u32 {
            match rand(10) {
                0..=4 => {
                    // Mostly near, some far (past a level's span), some already past.
                    let ahead = match rand(4) {
                        0 => rand(70),
                        1 => rand(5_000),
                        2 => rand(400_000),
                        _ => rand(100),
                    };
                    let tick = (now + ahead).saturating_sub(rand(3));
                    let key = wheel.insert(tick, waker());
                    model.insert((tick, step), key);
                }
                5..=6 => {
                    if let Some((&k, &key)) =
                        model.iter().nth(rand(model.len() as u64 + 1) as usize)
                    {
                        assert!(wheel.remove(key).is_some());
                        assert!(wheel.remove(key).is_none(), "removed once");
                        model.remove(&k);
                    }
                }
                _ => {
                    now += match rand(3) {
                        0 => rand(3),
                        1 => rand(200),
                        _ => rand(20_000),
                    };
                    let mut due = Vec::new();
                    wheel.advance(now, &mut due);
                    let want: Vec<_> = model.range(..(now + 1, 0)).map(|(k, _)| *k).collect();
                    assert_eq!(due.len(), want.len(), "at {now}");
                    for k in want {
                        let key = model.remove(&k).expect("listed");
                        assert!(wheel.get_mut(key).is_none(), "a fired entry is gone");
                    }
                    fired += due.len();
                    // Nothing left is due, and the wheel wakes no later than the earliest.
                    if let Some((&(first, _), _)) = model.iter().next() {
                        assert!(first > now);
                        let next = wheel.next_expiration().expect("entries left");
                        assert!(next <= first, "{next} > {first}");
                        assert!(next > now);
                    } else {
                        assert_eq!(wheel.next_expiration(), None);
                    }
                }
            }
            assert_eq!(wheel.len(), model.len());
        }
        assert!(fired > 10_000, "{fired}");
    }

    #[test]
    fn a_key_outlives_its_entry_without_reaching_the_next_one() {
        let mut wheel = TimerWheel::default();
        let a = wheel.insert(10, waker());
        assert!(wheel.remove(a).is_some());
        let b = wheel.insert(20, waker());
        assert_eq!(a.cell, b.cell, "the cell is reused");
        assert!(wheel.get_mut(a).is_none() && wheel.remove(a).is_none());
        assert!(wheel.get_mut(b).is_some());
        let mut due = Vec::new();
        wheel.advance(19, &mut due);
        assert!(due.is_empty());
        wheel.advance(20, &mut due);
        assert_eq!(due.len(), 1);
        assert!(wheel.is_empty() && wheel.get_mut(b).is_none());
    }

    #[test]
    fn a_far_entry_is_filed_down_and_fires_on_its_millisecond() {
        let mut wheel = TimerWheel::default();
        let far = 3 * 64 * 64 * 64 + 5 * 64 + 7;
        let key = wheel.insert(far, waker());
        assert_eq!(wheel.nodes[key.cell as usize].level, 3);
        let mut due = Vec::new();
        let mut wakes = 0;
        while let Some(next) = wheel.next_expiration() {
            wheel.advance(next, &mut due);
            wakes += 1;
            assert!(wakes <= LEVELS, "filed down once per level at most");
        }
        assert_eq!(due.len(), 1);
        assert_eq!(wheel.elapsed, far);
    }
}
