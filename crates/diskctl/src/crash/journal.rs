//! The writer's journal: one line per event, appended with one `write(2)` each on a file
//! opened with `O_APPEND | O_DSYNC`.
//!
//! Each record is written before the event it announces is relied on: "write issued" before
//! the request is submitted, "acknowledged" after it completed, "flush started" before
//! `sync_cache` is called, "flush done" after it returned. A SIGKILL cannot undo a record
//! whose `write(2)` returned (the kernel has it), and with `O_DSYNC` neither could a power
//! loss. A kill in the middle of a `write(2)` can leave a last line without its newline;
//! the reader drops it (the event it announced is then treated as not having happened,
//! which for "issued" is impossible: the request was not submitted yet).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use thiserror::Error;

/// What the journal says about the disk the writer opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Sectors on the disk.
    pub sector_count: u64,
    /// Bytes per sector.
    pub sector_size: u32,
    /// Whether the disk says a FUA write is durable when it completes.
    pub fua_respected: bool,
    /// Whether an unmapped sector reads back as zeros (`false`: unspecified contents).
    pub unmap_zeroes: bool,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The writer opened the disk; the first record.
    Header(Header),
    /// Write `id` of `count` sectors at `sector` is about to be submitted.
    Write {
        /// Write id, unique among all requests of the run, never 0.
        id: u64,
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
        /// Submitted with FUA.
        fua: bool,
    },
    /// Unmap `id` of `count` sectors at `sector` is about to be submitted.
    Unmap {
        /// Request id.
        id: u64,
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
    },
    /// Write or unmap `id` completed successfully.
    Ack {
        /// Request id.
        id: u64,
    },
    /// Flush `id` is about to be submitted: it covers every request acknowledged before
    /// this record.
    FlushStart {
        /// Request id.
        id: u64,
    },
    /// Flush `id` completed successfully.
    FlushDone {
        /// Request id.
        id: u64,
    },
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(h) => write!(
                f,
                "H {} {} {} {}",
                h.sector_count, h.sector_size, h.fua_respected as u8, h.unmap_zeroes as u8
            ),
            Self::Write {
                id,
                sector,
                count,
                fua,
            } => write!(f, "W {id} {sector} {count} {}", *fua as u8),
            Self::Unmap { id, sector, count } => write!(f, "U {id} {sector} {count}"),
            Self::Ack { id } => write!(f, "A {id}"),
            Self::FlushStart { id } => write!(f, "F {id}"),
            Self::FlushDone { id } => write!(f, "D {id}"),
        }
    }
}

/// The journal could not be written or read.
#[derive(Debug, Error)]
pub enum JournalError {
    /// The file could not be opened, written or read.
    #[error("journal {path}")]
    Io {
        /// The journal.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A complete line is not a record.
    #[error("journal {path}, line {line}: not a record: {text:?}")]
    Malformed {
        /// The journal.
        path: String,
        /// Line number, from 1.
        line: usize,
        /// The line.
        text: String,
    },
}

/// An open journal, appended to record by record.
pub struct JournalWriter {
    file: std::fs::File,
    path: String,
}

impl JournalWriter {
    /// Creates the journal at `path` (it must not exist).
    pub fn create(path: &Path) -> Result<Self, JournalError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .custom_flags(libc::O_DSYNC)
            .open(path)
            .map_err(|source| JournalError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.display().to_string(),
        })
    }

    /// Appends `record` with one `write(2)`; it is durable when this returns.
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        let line = format!("{record}\n");
        // A record is far shorter than a page, so one `write(2)` takes it whole.
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads every complete record of the journal at `path`.
pub fn read(path: &Path) -> Result<Vec<Record>, JournalError> {
    let shown = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| JournalError::Io {
        path: shown(),
        source,
    })?;
    // Only lines that end with a newline were written whole.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| {
            parse(line).ok_or_else(|| JournalError::Malformed {
                path: shown(),
                line: index + 1,
                text: line.chars().take(80).collect(),
            })
        })
        .collect()
}

fn parse(line: &str) -> Option<Record> {
    let mut words = line.split(' ');
    let tag = words.next()?;
    let numbers: Vec<u64> = words.map(|w| w.parse().ok()).collect::<Option<_>>()?;
    let flag = |n: u64| match n {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    };
    Some(match (tag, numbers.as_slice()) {
        ("H", &[sector_count, sector_size, fua, zeroes]) => Record::Header(Header {
            sector_count,
            sector_size: u32::try_from(sector_size).ok()?,
            fua_respected: flag(fua)?,
            unmap_zeroes: flag(zeroes)?,
        }),
        ("W", &[id, sector, count, fua]) => Record::Write {
            id,
            sector,
            count,
            fua: flag(fua)?,
        },
        ("U", &[id, sector, count]) => Record::Unmap { id, sector, count },
        ("A", &[id]) => Record::Ack { id },
        ("F", &[id]) => Record::FlushStart { id },
        ("D", &[id]) => Record::FlushDone { id },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_last_line_is_dropped() {
        let records = [
            Record::Header(Header {
                sector_count: 8192,
                sector_size: 512,
                fua_respected: true,
                unmap_zeroes: false,
            }),
            Record::Write {
                id: 1,
                sector: 7,
                count: 3,
                fua: true,
            },
            Record::Unmap {
                id: 2,
                sector: 100,
                count: 8,
            },
            Record::Ack { id: 1 },
            Record::FlushStart { id: 3 },
            Record::FlushDone { id: 3 },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut journal = JournalWriter::create(&path).unwrap();
        for record in &records {
            journal.append(record).unwrap();
        }
        assert_eq!(read(&path).unwrap(), records);
        // A kill in the middle of a record.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"A 2")
            .unwrap();
        assert_eq!(read(&path).unwrap(), records);
        std::fs::write(&path, "W 1 2\n").unwrap();
        assert!(matches!(
            read(&path),
            Err(JournalError::Malformed { line: 1, .. })
        ));
    }
}
