//! What each sector may hold after the kill, from the journal.
//!
//! The writer never has two requests on the same sector in flight, so the writes and unmaps
//! of one sector are totally ordered: each was issued after the previous one was
//! acknowledged. For a sector, the *last settled* request is the latest one that must
//! survive; the sector may hold its result or the result of any later request to it
//! (acknowledged but not yet settled, or still in flight), and nothing else. Before its first
//! settled request it may also still hold the initial contents.
//!
//! Two definitions of settled, checked together:
//! - the contract (DESIGN §2, what a power loss may keep): acknowledged before the start of
//!   a flush that completed, or a FUA write acknowledged on a disk that respects FUA;
//! - process crash (a stack that keeps no volatile state of its own): acknowledged. The
//!   kernel keeps what a killed process handed it, so a stack over files and block devices
//!   must not lose an acknowledged write to SIGKILL, flushed or not.

use super::journal::{Header, Record};
use super::stamp::{Content, INITIAL_WRITE};
use thiserror::Error;

/// The journal contradicts itself: a bug of the writer, not of the disk.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The first record is not the header.
    #[error("the journal does not start with a header")]
    NoHeader,
    /// A second header.
    #[error("record {0}: a second header")]
    SecondHeader(usize),
    /// A request id seen twice, or 0.
    #[error("record {0}: request id {1} reused")]
    ReusedId(usize, u64),
    /// An acknowledgement or flush completion of a request never issued, or twice.
    #[error("record {0}: completion of request {1}, which is not in flight")]
    UnknownCompletion(usize, u64),
    /// A range outside the disk, or empty.
    #[error("record {0}: range {1}+{2} is empty or outside the disk")]
    BadRange(usize, u64, u64),
    /// A request issued on sectors another request in flight covers.
    #[error("record {0}: request {1} overlaps request {2}, which is in flight")]
    Overlap(usize, u64, u64),
}

/// What a request leaves in a sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// What the sector held before the writer started, byte for byte.
    Initial,
    /// The data of this write.
    Write(u64),
    /// Zeros (an unmap on a disk whose unmapped sectors read as zeros).
    Zeroes,
    /// Anything but another sector's data (an unmap whose result is unspecified).
    Unspecified,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Initial => f.write_str("the initial contents"),
            Self::Write(write) => write!(f, "write {write}"),
            Self::Zeroes => f.write_str("unmapped (zeros)"),
            Self::Unspecified => f.write_str("unmapped (unspecified)"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Request {
    outcome: Outcome,
    /// Index of the acknowledgement record.
    acked_at: Option<usize>,
    fua: bool,
}

/// Counts from one journal.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Writes acknowledged (FUA included).
    pub writes_acked: u64,
    /// FUA writes acknowledged.
    pub fua_acked: u64,
    /// Unmaps acknowledged.
    pub unmaps_acked: u64,
    /// Flushes completed.
    pub flushes_done: u64,
    /// Writes and unmaps issued and not acknowledged when the writer died.
    pub in_flight: u64,
}

/// Which property a sector broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    /// The durability contract: a flushed or FUA write lost, or data that no request put
    /// there.
    Contract,
    /// Process-crash consistency: an acknowledged write lost to a SIGKILL.
    ProcessCrash,
}

/// One sector that holds what it must not.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The sector.
    pub sector: u64,
    /// What it holds.
    pub found: Content,
    /// What it may hold under `property`.
    pub allowed: Vec<Outcome>,
    /// The property broken.
    pub property: Property,
}

impl Violation {
    /// This violation, said of the sectors from `self.sector` to `last` (which broke the
    /// same rule the same way).
    pub fn describe(&self, last: u64) -> String {
        let allowed: Vec<String> = self.allowed.iter().map(Outcome::to_string).collect();
        let sectors = if last > self.sector {
            format!("sectors {} to {last} hold", self.sector)
        } else {
            format!("sector {} holds", self.sector)
        };
        format!(
            "{sectors} {}; {} allows only: {}",
            self.found,
            match self.property {
                Property::Contract => "the durability contract",
                Property::ProcessCrash => "process-crash consistency",
            },
            allowed.join(", ")
        )
    }
}

/// The journal replayed: every sector's requests in order, and which are settled.
pub struct Model {
    header: Header,
    requests: Vec<Request>,
    /// Per sector, indices into `requests`, oldest first.
    per_sector: Vec<Vec<u32>>,
    /// Records before this index that acknowledge a request are covered by a completed
    /// flush.
    flushed_before: usize,
    summary: Summary,
}

impl Model {
    /// Replays `records`.
    pub fn new(records: &[Record]) -> Result<Self, ModelError> {
        let Some(Record::Header(header)) = records.first() else {
            return Err(ModelError::NoHeader);
        };
        let header = header.clone();
        let mut requests: Vec<Request> = Vec::new();
        let mut per_sector: Vec<Vec<u32>> = vec![Vec::new(); header.sector_count as usize];
        // Request id -> (index into `requests`, range) for writes and unmaps in flight, and
        // flush id -> start record for flushes in flight.
        let mut in_flight: std::collections::HashMap<u64, (usize, u64, u64)> = Default::default();
        let mut flushes: std::collections::HashMap<u64, usize> = Default::default();
        let mut seen = std::collections::HashSet::new();
        let mut flushed_before = 0;
        let mut summary = Summary::default();
        for (at, record) in records.iter().enumerate().skip(1) {
            let mut issue = |id: u64, sector: u64, count: u64, outcome: Outcome, fua: bool| {
                if id == 0 || !seen.insert(id) {
                    return Err(ModelError::ReusedId(at, id));
                }
                let end = sector
                    .checked_add(count)
                    .filter(|&end| count > 0 && end <= header.sector_count)
                    .ok_or(ModelError::BadRange(at, sector, count))?;
                if let Some((other, _)) = in_flight
                    .iter()
                    .find(|(_, (_, s, e))| sector < *e && *s < end)
                {
                    return Err(ModelError::Overlap(at, id, *other));
                }
                let index = requests.len();
                requests.push(Request {
                    outcome,
                    acked_at: None,
                    fua,
                });
                for list in &mut per_sector[sector as usize..end as usize] {
                    list.push(index as u32);
                }
                in_flight.insert(id, (index, sector, end));
                Ok(())
            };
            match *record {
                Record::Header(_) => return Err(ModelError::SecondHeader(at)),
                Record::Write {
                    id,
                    sector,
                    count,
                    fua,
                } => issue(id, sector, count, Outcome::Write(id), fua)?,
                Record::Unmap { id, sector, count } => {
                    let outcome = if header.unmap_zeroes {
                        Outcome::Zeroes
                    } else {
                        Outcome::Unspecified
                    };
                    issue(id, sector, count, outcome, false)?
                }
                Record::Ack { id } => {
                    let (index, _, _) = in_flight
                        .remove(&id)
                        .ok_or(ModelError::UnknownCompletion(at, id))?;
                    let request = &mut requests[index];
                    request.acked_at = Some(at);
                    match request.outcome {
                        Outcome::Write(_) => {
                            summary.writes_acked += 1;
                            summary.fua_acked += request.fua as u64;
                        }
                        _ => summary.unmaps_acked += 1,
                    }
                }
                Record::FlushStart { id } => {
                    if id == 0 || !seen.insert(id) {
                        return Err(ModelError::ReusedId(at, id));
                    }
                    flushes.insert(id, at);
                }
                Record::FlushDone { id } => {
                    let started = flushes
                        .remove(&id)
                        .ok_or(ModelError::UnknownCompletion(at, id))?;
                    flushed_before = flushed_before.max(started);
                    summary.flushes_done += 1;
                }
            }
        }
        summary.in_flight = in_flight.len() as u64;
        Ok(Self {
            header,
            requests,
            per_sector,
            flushed_before,
            summary,
        })
    }

    /// The disk the writer saw.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Counts of the replayed journal.
    pub fn summary(&self) -> Summary {
        self.summary
    }

    fn settled(&self, request: &Request, property: Property) -> bool {
        let Some(acked_at) = request.acked_at else {
            return false;
        };
        match property {
            Property::ProcessCrash => true,
            Property::Contract => {
                acked_at < self.flushed_before || (request.fua && self.header.fua_respected)
            }
        }
    }

    /// What `sector` may hold under `property`.
    pub fn allowed(&self, sector: u64, property: Property) -> Vec<Outcome> {
        let list = &self.per_sector[sector as usize];
        let last_settled = list
            .iter()
            .rposition(|&index| self.settled(&self.requests[index as usize], property));
        let mut allowed = Vec::new();
        if last_settled.is_none() {
            allowed.push(Outcome::Initial);
        }
        allowed.extend(
            list[last_settled.unwrap_or(0)..]
                .iter()
                .map(|&index| self.requests[index as usize].outcome),
        );
        allowed
    }

    /// Checks what `sector` holds (`unchanged`: byte for byte what it held before the writer
    /// started); with `process_crash`, also that no acknowledged request was lost.
    pub fn check(
        &self,
        sector: u64,
        found: Content,
        unchanged: bool,
        process_crash: bool,
    ) -> Option<Violation> {
        let mut properties = vec![Property::Contract];
        if process_crash {
            properties.push(Property::ProcessCrash);
        }
        properties.into_iter().find_map(|property| {
            let allowed = self.allowed(sector, property);
            let explained = allowed
                .iter()
                .any(|outcome| self.explains(sector, *outcome, found, unchanged));
            (!explained).then_some(Violation {
                sector,
                found,
                allowed,
                property,
            })
        })
    }

    /// Whether `outcome` of a request to `sector` explains `found`.
    fn explains(&self, sector: u64, outcome: Outcome, found: Content, unchanged: bool) -> bool {
        match (outcome, found) {
            (Outcome::Initial, _) => unchanged,
            (Outcome::Write(expected), Content::Write(write)) => expected == write,
            (Outcome::Zeroes, Content::Zeroes) => true,
            // Whatever an unmapped sector reads as, it is not data written for another
            // sector, nor data of a write that never covered this one.
            (Outcome::Unspecified, Content::Write(write)) => {
                write == INITIAL_WRITE
                    || self.per_sector[sector as usize].iter().any(|&index| {
                        self.requests[index as usize].outcome == Outcome::Write(write)
                    })
            }
            (Outcome::Unspecified, Content::Zeroes | Content::Garbage) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fua_respected: bool, unmap_zeroes: bool) -> Record {
        Record::Header(Header {
            sector_count: 16,
            sector_size: 512,
            fua_respected,
            unmap_zeroes,
        })
    }

    fn write(id: u64, sector: u64, count: u64, fua: bool) -> Record {
        Record::Write {
            id,
            sector,
            count,
            fua,
        }
    }

    #[test]
    fn settled_requests_bound_what_a_sector_may_hold() {
        use Content as C;
        let model = Model::new(&[
            header(true, true),
            write(1, 0, 4, false),
            Record::Ack { id: 1 },
            Record::FlushStart { id: 2 },
            // Acknowledged after the flush started: not covered by it.
            write(3, 2, 4, false),
            Record::Ack { id: 3 },
            Record::FlushDone { id: 2 },
            write(4, 8, 2, true),
            Record::Ack { id: 4 },
            Record::Unmap {
                id: 5,
                sector: 0,
                count: 1,
            },
            write(6, 10, 1, false),
        ])
        .unwrap();
        let s = model.summary();
        assert_eq!(
            (
                s.writes_acked,
                s.fua_acked,
                s.unmaps_acked,
                s.flushes_done,
                s.in_flight
            ),
            (3, 1, 0, 1, 2)
        );
        // Sector 0: write 1 flushed, then an unmap in flight.
        assert!(model.check(0, C::Write(1), false, true).is_none());
        assert!(model.check(0, C::Zeroes, false, true).is_none());
        assert!(model.check(0, C::Write(0), true, false).is_some());
        // Sector 2: write 1 flushed, write 3 only acknowledged.
        assert!(model.check(2, C::Write(1), false, false).is_none());
        let lost = model.check(2, C::Write(1), false, true).unwrap();
        assert_eq!(lost.property, Property::ProcessCrash);
        assert!(model.check(2, C::Write(3), false, true).is_none());
        // Sector 4: only write 3, not flushed: the initial contents survive a power loss.
        assert!(model.check(4, C::Write(0), true, false).is_none());
        assert!(model.check(4, C::Write(0), true, true).is_some());
        // Sector 8: a FUA write.
        assert_eq!(
            model.check(8, C::Write(0), true, false).unwrap().property,
            Property::Contract
        );
        // Sector 10: a write in flight; sector 12: never written.
        assert!(model.check(10, C::Write(0), true, true).is_none());
        assert!(model.check(10, C::Write(6), false, true).is_none());
        assert!(model.check(12, C::Write(0), true, true).is_none());
        for bad in [
            C::Zeroes,
            C::Garbage,
            C::Write(1),
            C::Misplaced {
                sector: 13,
                write: 0,
            },
        ] {
            assert!(model.check(12, bad, false, false).is_some(), "{bad}");
        }
    }

    #[test]
    fn unspecified_unmaps_allow_anything_but_foreign_data() {
        use Content as C;
        let model = Model::new(&[
            header(false, false),
            write(1, 0, 2, true),
            Record::Ack { id: 1 },
            write(2, 4, 2, false),
            Record::Ack { id: 2 },
            Record::Unmap {
                id: 3,
                sector: 0,
                count: 1,
            },
            Record::Ack { id: 3 },
        ])
        .unwrap();
        // FUA is not durable on this disk.
        assert!(model.check(1, C::Write(0), true, false).is_none());
        for fine in [C::Zeroes, C::Garbage, C::Write(0), C::Write(1)] {
            assert!(model.check(0, fine, false, true).is_none(), "{fine}");
        }
        assert!(model.check(0, C::Write(2), false, false).is_some());
    }

    #[test]
    fn a_contradictory_journal_is_refused() {
        assert!(matches!(Model::new(&[]), Err(ModelError::NoHeader)));
        let cases = [
            vec![write(1, 0, 2, false), write(1, 4, 2, false)],
            vec![write(1, 0, 2, false), write(2, 1, 2, false)],
            vec![write(1, 15, 2, false)],
            vec![write(1, 0, 0, false)],
            vec![Record::Ack { id: 9 }],
            vec![Record::FlushDone { id: 9 }],
            vec![header(true, true)],
        ];
        for case in cases {
            let mut records = vec![header(true, true)];
            records.extend(case.clone());
            assert!(Model::new(&records).is_err(), "{case:?}");
        }
    }
}
