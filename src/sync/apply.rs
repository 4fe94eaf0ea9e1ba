//! The one way a change reaches a gateway's key table, for every source: the store file, the
//! feed, the local feed cache (and the Redis follower when it lands). Two rules live here:
//!
//! - **Revocation is final**: a record or snapshot that would bring back a key this table holds
//!   as revoked (by id, or by digest under another id) is applied with the revocation kept,
//!   and reported. Whatever the source says: a restored backup, a replayed or edited feed, a
//!   tampered cache. A new table (new log) carries over every revoked key of the old one.
//! - **Never backwards**: within one log, a snapshot older than what is applied is refused and
//!   records at or below the applied revision are ignored as replays. A different log id
//!   (a restore, a replaced store) is a whole new table, never merged by revision.
//! - **No wholesale loss** (THREATS I6): a whole new table from the feed, the store file or
//!   the Redis store that leaves out most of the live keys held is refused (`shrink`). Keys
//!   are revoked by record, never deleted, so a table without them is a store emptied or
//!   mistaken for another (a volume not mounted, an old backup restored, a flushed or wrong
//!   database). Its revocations are obeyed all the same (`revocations_of_refused`).
//!
//! Sources verify MACs before they call in here (`store::seal`); this module decides only
//! what a verified change may do to the table.

use crate::keys::record::{unrevokes, KeyRecord};
use crate::keys::table::KeyTable;
use crate::store::seal::LogId;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("log {log} offered at revision {offered}, older than revision {applied} already applied: refusing a rollback")]
    Backwards {
        log: LogId,
        offered: u64,
        applied: u64,
    },
    #[error("records of log {offered} cannot extend a table of log {table}: a new log needs a whole table")]
    OtherLog { table: LogId, offered: LogId },
    #[error("a whole table of log {log} leaves out {vanished} of the {live} live keys held, more than `[keys] max_snapshot_drop_percent` = {max_percent} allows: keeping the last good table (is the store empty, an old backup or another store?)")]
    Shrink {
        log: LogId,
        live: usize,
        vanished: usize,
        max_percent: u8,
        /// The keys this node held live that the refused table holds revoked, revoked here
        /// all the same (`revocations_of_refused`, filled in by `sync::file::shrink`): what
        /// the node's local copy must take too.
        revoked_here: Vec<String>,
    },
}

impl Refusal {
    /// Closed label for `keygate_source_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Backwards { .. } | Refusal::OtherLog { .. } => "rollback",
            Refusal::Shrink { .. } => "shrink",
        }
    }
}

/// Below this many live keys the shrink rule does not apply: a table that small changes
/// wholesale in trials and demos, and its loss is plain to see.
pub const SHRINK_MIN_LIVE: usize = 10;

/// What an apply did, for metrics, logs and audit.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// `written_at_ms` of each record that changed the table (propagation histogram).
    pub written_at_ms: Vec<i64>,
    /// Ids whose revocation was kept against what the source said.
    pub kept_revoked: Vec<String>,
    /// Rotation events among the records applied incrementally (a whole-table load is state,
    /// not events, and counts none).
    pub rotations: Vec<crate::keys::rotation::RotationEvent>,
}

/// Told of each change an incremental apply makes to a table, so what is derived from the
/// table (the key gauges, `keys::gauges`) follows it without a scan. Whole-table loads are
/// counted afresh where they are installed (`Gateway::install_table`).
pub trait Observer {
    /// `old` (the version the table held, if any) was replaced by `new`; `new` is `None` when
    /// `old` left the table (displaced by another id with its digest).
    fn changed(&mut self, old: Option<&KeyRecord>, new: Option<&KeyRecord>);
}

/// Nobody to tell (tests, tools).
impl Observer for () {
    fn changed(&mut self, _: Option<&KeyRecord>, _: Option<&KeyRecord>) {}
}

/// The revoked version `table` holds for the key `r` names (by id, or by its digest under any
/// id), if any.
fn held_revoked(table: &KeyTable, r: &KeyRecord) -> Option<Arc<KeyRecord>> {
    table
        .get_by_id(&r.id)
        .filter(|h| h.revoked_at.is_some())
        .or_else(|| {
            table
                .get_by_digest(&r.digest)
                .filter(|h| h.revoked_at.is_some())
        })
}

/// `r`, or the revoked version `table` holds in its place (at `r`'s revision, so the log's
/// order is kept).
fn keep_revoked(table: &KeyTable, r: KeyRecord, out: &mut Applied) -> KeyRecord {
    match held_revoked(table, &r) {
        Some(h) if unrevokes(Some(&h), &r) => {
            out.kept_revoked.push(r.id.clone());
            KeyRecord {
                rev: r.rev,
                id: r.id,
                ..(*h).clone()
            }
        }
        _ => r,
    }
}

/// Apply records that follow `table` in its own log, in revision order; `rev` is the
/// revision the source is at afterwards (a compaction meta line can raise it alone).
pub fn records(
    table: &KeyTable,
    log: LogId,
    records: Vec<KeyRecord>,
    rev: u64,
    observer: &mut impl Observer,
) -> Result<Applied, Refusal> {
    if log != table.log() {
        return Err(Refusal::OtherLog {
            table: table.log(),
            offered: log,
        });
    }
    let mut out = Applied::default();
    let applied = table.revision();
    for r in records {
        if r.rev <= applied {
            continue; // a replay of something this table has
        }
        let written = r.written_at_ms;
        let r = keep_revoked(table, r, &mut out);
        let held = table.get_by_id(&r.id);
        let displaced = table.get_by_digest(&r.digest).filter(|d| d.id != r.id);
        let event = crate::keys::rotation::event(held.as_deref(), &r);
        let id = r.id.clone();
        if table.apply(r) {
            if let Some(d) = &displaced {
                observer.changed(Some(d), None);
            }
            observer.changed(held.as_deref(), table.get_by_id(&id).as_deref());
            out.rotations.extend(event);
            out.written_at_ms.push(written);
        }
    }
    table.advance(rev);
    Ok(out)
}

/// Build the table that replaces `current` from a whole snapshot of `log` at `rev`. The new
/// table keeps every revocation `current` holds: keys the snapshot would un-revoke stay
/// revoked, and revoked keys it does not mention at all are carried over (at revision 0: they
/// are not part of the new log's order, only a memory of the old one). The new table stands
/// at `rev`, whatever its records' own revisions: a node's local copy also holds revocations
/// it obeyed from a table it refused (`revocations_of_refused`), numbered one past the
/// version they replaced and no place in the log, which must not move a restarted node
/// past the log's next record.
pub fn snapshot(
    current: &KeyTable,
    log: LogId,
    rev: u64,
    records: Vec<KeyRecord>,
) -> Result<(KeyTable, Applied), Refusal> {
    if log == current.log() && rev < current.revision() {
        return Err(Refusal::Backwards {
            log,
            offered: rev,
            applied: current.revision(),
        });
    }
    let mut out = Applied::default();
    let table = KeyTable::sized(log, records.len());
    for r in records {
        let r = keep_revoked(current, r, &mut out);
        table.apply_keeping_revision(r);
    }
    for old in current.revoked() {
        if table.get_by_id(&old.id).is_none() && table.get_by_digest(&old.digest).is_none() {
            table.apply_keeping_revision(KeyRecord {
                rev: 0,
                ..(*old).clone()
            });
        }
    }
    table.advance(rev);
    Ok((table, out))
}

/// The shrink rule: `next` may replace `current` unless, of the `live` keys `current` holds
/// (neither revoked nor expired at `now`; at least [`SHRINK_MIN_LIVE`]), more than
/// `max_percent` % are in `next` neither by id nor by digest. A key `next` holds revoked was
/// revoked, not lost, and does not count. 100 turns the rule off.
pub fn shrink(
    current: &KeyTable,
    next: &KeyTable,
    max_percent: u8,
    now: i64,
) -> Result<(), Refusal> {
    use crate::keys::record::KeyState;
    let (mut live, mut vanished) = (0usize, 0usize);
    for r in current.records() {
        if matches!(r.state(now), KeyState::Revoked | KeyState::Expired) {
            continue;
        }
        live += 1;
        if next.get_by_id(&r.id).is_none() && next.get_by_digest(&r.digest).is_none() {
            vanished += 1;
        }
    }
    if live >= SHRINK_MIN_LIVE && vanished * 100 > live * usize::from(max_percent) {
        return Err(Refusal::Shrink {
            log: next.log(),
            live,
            vanished,
            max_percent,
            revoked_here: Vec::new(),
        });
    }
    Ok(())
}

/// The revocations of a whole table `shrink` refused, applied to `current` all the same. A
/// revocation only narrows what the table lets in, so obeying one cannot let anyone in,
/// whatever the refused table's origin; and a node keeps its last good table until the store
/// is put right, so without this a key revoked meanwhile (a leaked key, revoked during the
/// very incident) would stay live on it until then. Each key `current` holds live (by id, or
/// by digest under any id) that `refused` holds revoked is revoked here, numbered after the
/// version held; the table's own revision, its place in its log, does not move
/// (`KeyTable::apply_keeping_revision`): when the version held is the log's newest, a revision
/// moved one past it would make the log's next record look like a replay and a snapshot at
/// the revision held look backwards. Returns the ids revoked.
pub fn revocations_of_refused(
    current: &KeyTable,
    refused: &KeyTable,
    observer: &mut impl Observer,
) -> Vec<String> {
    obey_revocations(current, refused.revoked().iter().map(|r| &**r), observer)
}

/// Revoke in `current` each key it holds live (by id, or by digest under any id) that one of
/// `revoked` revokes, numbered after the version held, without moving the table's revision
/// (`KeyTable::apply_keeping_revision`). A revocation only narrows what the table lets in, so
/// obeying one from a source this table does not follow is safe whatever its origin: a whole
/// table refused (`revocations_of_refused`), or the revocations a store's writers recorded
/// beside the log (`store::ledger`, read by `sync::file` with a restarted gateway's first
/// table). Returns the ids revoked.
pub fn obey_revocations<'r>(
    current: &KeyTable,
    revoked: impl IntoIterator<Item = &'r KeyRecord>,
    observer: &mut impl Observer,
) -> Vec<String> {
    let live = |h: &Arc<KeyRecord>| h.revoked_at.is_none();
    let mut obeyed = Vec::new();
    for r in revoked.into_iter().filter(|r| r.revoked_at.is_some()) {
        let held = current
            .get_by_id(&r.id)
            .filter(live)
            .or_else(|| current.get_by_digest(&r.digest).filter(live));
        let Some(held) = held else { continue };
        let id = held.id.clone();
        let next = KeyRecord {
            rev: held.rev.saturating_add(1),
            revoked_at: r.revoked_at,
            ..(*held).clone()
        };
        if current.apply_keeping_revision(next) {
            observer.changed(Some(&held), current.get_by_id(&id).as_deref());
            obeyed.push(id);
        }
    }
    obeyed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    const L1: LogId = LogId(1);
    const L2: LogId = LogId(2);

    fn rec(id: &str, n: u8, rev: u64, revoked: bool) -> KeyRecord {
        KeyRecord {
            rev,
            revoked_at: revoked.then_some(10),
            ..sample(id, Digest([n; 32]))
        }
    }

    /// A table in L1 where key_a (rev 3) is revoked and key_b (rev 2) is active.
    fn base() -> KeyTable {
        let (t, _) = snapshot(
            &KeyTable::new(),
            L1,
            3,
            vec![rec("key_b", 2, 2, false), rec("key_a", 1, 3, true)],
        )
        .unwrap();
        t
    }

    /// A copy sharing nothing, to compare after the run.
    fn copy(t: &KeyTable) -> KeyTable {
        KeyTable::from_records(
            t.records().iter().map(|r| (**r).clone()),
            t.log(),
            t.revision(),
        )
    }

    fn revoked(t: &KeyTable, id: &str) -> bool {
        t.get_by_id(id).is_some_and(|r| r.revoked_at.is_some())
    }

    #[test]
    fn every_ordering_keeps_revocation_final_and_never_moves_backwards() {
        struct Case {
            name: &'static str,
            run: fn(&KeyTable) -> Result<KeyTable, Refusal>,
            expect_revoked_a: bool,
            refused: bool,
        }
        let cases = [
            Case {
                name: "newer record without the revocation",
                run: |t| {
                    let out = records(t, L1, vec![rec("key_a", 1, 4, false)], 4, &mut ())?;
                    assert_eq!(out.kept_revoked, ["key_a"]);
                    Ok(copy(t))
                },
                expect_revoked_a: true,
                refused: false,
            },
            Case {
                name: "replay of an older active version",
                run: |t| {
                    let out = records(t, L1, vec![rec("key_a", 1, 1, false)], 3, &mut ())?;
                    assert!(out.written_at_ms.is_empty(), "replay ignored");
                    Ok(copy(t))
                },
                expect_revoked_a: true,
                refused: false,
            },
            Case {
                name: "another id with the revoked key's digest",
                run: |t| {
                    let out = records(t, L1, vec![rec("key_evil", 1, 5, false)], 5, &mut ())?;
                    assert_eq!(out.kept_revoked, ["key_evil"]);
                    assert!(revoked(t, "key_evil"));
                    Ok(copy(t))
                },
                expect_revoked_a: true,
                refused: false,
            },
            Case {
                name: "snapshot of the same log, older",
                run: |t| snapshot(t, L1, 2, vec![rec("key_a", 1, 1, false)]).map(|x| x.0),
                expect_revoked_a: true,
                refused: true,
            },
            Case {
                name: "snapshot of the same log, newer, without the revocation",
                run: |t| {
                    let (n, out) = snapshot(
                        t,
                        L1,
                        9,
                        vec![rec("key_b", 2, 2, false), rec("key_a", 1, 9, false)],
                    )?;
                    assert_eq!(out.kept_revoked, ["key_a"]);
                    Ok(n)
                },
                expect_revoked_a: true,
                refused: false,
            },
            Case {
                name: "snapshot of a new log (restore), older revisions, without the key at all",
                run: |t| snapshot(t, L2, 1, vec![rec("key_b", 2, 1, false)]).map(|x| x.0),
                expect_revoked_a: true,
                refused: false,
            },
            Case {
                name: "records of another log cannot extend this table",
                run: |t| {
                    records(t, L2, vec![rec("key_a", 1, 10, false)], 10, &mut ()).map(|_| copy(t))
                },
                expect_revoked_a: true,
                refused: true,
            },
        ];
        for c in cases {
            let t = base();
            match (c.run)(&t) {
                Ok(next) => {
                    assert!(!c.refused, "{}: should be refused", c.name);
                    // key_a's secret (its digest) is what must stay dead, under any id.
                    let a = next.get_by_digest(&Digest([1; 32]));
                    assert_eq!(
                        a.is_some_and(|r| r.revoked_at.is_some()),
                        c.expect_revoked_a,
                        "{}",
                        c.name
                    );
                    assert!(!revoked(&next, "key_b"), "{}", c.name);
                }
                Err(e) => {
                    assert!(c.refused, "{}: refused with {e}", c.name);
                    assert!(revoked(&t, "key_a"), "{}: table untouched", c.name);
                    assert_eq!(t.revision(), 3, "{}: table untouched", c.name);
                }
            }
        }
    }

    #[test]
    fn a_whole_table_that_leaves_out_most_live_keys_is_refused() {
        let held: Vec<KeyRecord> = (0..20u8)
            .map(|n| rec(&format!("key_{n}"), n, u64::from(n) + 1, n >= 18))
            .collect();
        let (t, _) = snapshot(&KeyTable::new(), L1, 20, held.clone()).unwrap();
        // 18 live keys (two revoked). A new log holding 9 of them, and the two revoked ones
        // left out too: 9 of 18 vanished, exactly 50 %: allowed; one more is not.
        let keep = |n: usize| -> KeyTable {
            let records = held[..n].iter().map(|r| KeyRecord {
                rev: 1,
                ..r.clone()
            });
            snapshot(&t, L2, 1, records.collect()).unwrap().0
        };
        const NOW: i64 = 100; // after the revocations (at 10) and expiries (at 5) below
        assert_eq!(shrink(&t, &keep(9), 50, NOW), Ok(()));
        assert_eq!(
            shrink(&t, &keep(8), 50, NOW),
            Err(Refusal::Shrink {
                log: L2,
                live: 18,
                vanished: 10,
                max_percent: 50,
                revoked_here: Vec::new(),
            })
        );
        assert_eq!(shrink(&t, &keep(0), 100, NOW), Ok(()), "100 turns it off");
        let every = |change: fn(&mut KeyRecord)| -> Vec<KeyRecord> {
            let mut all = held.clone();
            all.iter_mut().for_each(change);
            all
        };
        // Revoked in the new table is revoked, not lost.
        let all_revoked = every(|r| r.revoked_at = Some(5));
        let (revoked, _) = snapshot(&t, L1, 30, all_revoked).unwrap();
        assert_eq!(shrink(&t, &revoked, 0, NOW), Ok(()));
        // Expired keys are not live; a small table is not guarded.
        let expired = every(|r| r.expires_at = Some(5));
        let (e, _) = snapshot(&KeyTable::new(), L1, 20, expired).unwrap();
        assert_eq!(shrink(&e, &keep(0), 0, NOW), Ok(()));
        let (small, _) = snapshot(&KeyTable::new(), L1, 9, held[..9].to_vec()).unwrap();
        assert_eq!(shrink(&small, &keep(0), 0, NOW), Ok(()));
    }

    /// A refused whole table still revokes: key_3 by id, key_5 by digest under another id;
    /// key_18 (revoked in both) and the keys it leaves out or holds live are untouched, the
    /// table's revision does not move, and a second look revokes nothing more.
    #[test]
    fn a_refused_whole_table_still_revokes() {
        let held: Vec<KeyRecord> = (0..20u8)
            .map(|n| rec(&format!("key_{n}"), n, u64::from(n) + 1, n >= 18))
            .collect();
        let (t, _) = snapshot(&KeyTable::new(), L1, 20, held).unwrap();
        let refused = KeyTable::from_records(
            [
                rec("key_3", 3, 1, true),
                rec("key_other", 5, 2, true),
                rec("key_4", 4, 3, false),
                rec("key_18", 18, 4, true),
            ],
            L2,
            4,
        );
        assert!(shrink(&t, &refused, 50, 100).is_err());
        let mut seen = Vec::new();
        struct Seen<'a>(&'a mut Vec<(bool, bool)>);
        impl Observer for Seen<'_> {
            fn changed(&mut self, old: Option<&KeyRecord>, new: Option<&KeyRecord>) {
                let revoked = |r: Option<&KeyRecord>| r.is_some_and(|r| r.revoked_at.is_some());
                self.0.push((revoked(old), revoked(new)));
            }
        }
        let ids = revocations_of_refused(&t, &refused, &mut Seen(&mut seen));
        assert_eq!(ids, ["key_3", "key_5"]);
        assert_eq!(seen, [(false, true), (false, true)], "told of each");
        for n in 0..20 {
            let id = format!("key_{n}");
            assert_eq!(revoked(&t, &id), n == 3 || n == 5 || n >= 18, "{id}");
        }
        assert_eq!(t.get_by_id("key_3").unwrap().rev, 5, "after the one held");
        assert_eq!(t.revision(), 20);
        assert_eq!(t.log(), L1);
        assert!(revocations_of_refused(&t, &refused, &mut ()).is_empty());
    }

    /// Obeying a refused table's revocation of the key whose held version is the table's
    /// newest leaves the table's revision where it stood, so the log's next record (at the
    /// revision after it) is still applied; and so does the table a restart rebuilds from the
    /// local copy (the records as enforced, sealed at the revision held).
    #[test]
    fn obeying_a_refused_table_leaves_the_revision_where_it_stood() {
        let held: Vec<KeyRecord> = (0..20u8)
            .map(|n| rec(&format!("key_{n}"), n, u64::from(n) + 1, false))
            .collect();
        let (t, _) = snapshot(&KeyTable::new(), L1, 20, held).unwrap();
        let refused = KeyTable::from_records([rec("key_19", 19, 1, true)], L2, 1);
        assert!(shrink(&t, &refused, 50, 100).is_err());
        assert_eq!(revocations_of_refused(&t, &refused, &mut ()), ["key_19"]);
        assert!(revoked(&t, "key_19"));
        assert_eq!(t.revision(), 20, "the table's place in its log");

        let mut enforced: Vec<KeyRecord> = t.records().iter().map(|r| (**r).clone()).collect();
        enforced.sort_by_key(|r| r.rev);
        let (restarted, _) = snapshot(&KeyTable::new(), L1, 20, enforced).unwrap();
        assert_eq!(
            restarted.revision(),
            20,
            "the copy's seal, not the obeyed version"
        );
        assert!(
            revoked(&restarted, "key_19"),
            "the revocation survives a restart"
        );

        for table in [&t, &restarted] {
            let same = snapshot(table, L1, 20, vec![rec("key_0", 0, 1, false)]);
            assert!(
                same.is_ok(),
                "a snapshot at the revision held is not backwards"
            );
            let out = records(table, L1, vec![rec("key_new", 30, 21, false)], 21, &mut ());
            assert_eq!(out.unwrap().written_at_ms.len(), 1, "the log's next record");
            assert!(table.get_by_id("key_new").is_some());
            assert!(revoked(table, "key_19"));
            assert_eq!(table.revision(), 21);
        }
    }

    #[test]
    fn revocations_and_new_keys_still_apply() {
        let t = base();
        let out = records(
            &t,
            L1,
            vec![rec("key_b", 2, 4, true), rec("key_c", 3, 5, false)],
            6,
            &mut (),
        )
        .unwrap();
        assert_eq!(out.written_at_ms.len(), 2);
        assert!(out.kept_revoked.is_empty());
        assert!(revoked(&t, "key_b"));
        assert!(t.get_by_id("key_c").is_some());
        assert_eq!(t.revision(), 6, "meta revision advances the table");
        // A carried-over revocation does not raise the new log's revision.
        let (n, _) = snapshot(&t, L2, 2, vec![rec("key_c", 3, 2, false)]).unwrap();
        assert_eq!(n.revision(), 2);
        assert!(revoked(&n, "key_a") && revoked(&n, "key_b"));
        assert_eq!(n.log(), L2);
    }
}
