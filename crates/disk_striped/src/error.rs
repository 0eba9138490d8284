//! Errors: building a striped disk, and the member index carried by I/O errors.

use disk_backend::DiskError;
use thiserror::Error;

/// Building a [`StripedDisk`](crate::StripedDisk) failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NewStripedDiskError {
    /// The list of member disks is empty.
    #[error("a striped disk needs at least one member disk")]
    NoDisks,
    /// The chunk size is zero or not a multiple of the sector size.
    #[error(
        "invalid chunk size {chunk_size_bytes}: must be a non-zero multiple of the sector size {sector_size}"
    )]
    InvalidChunkSize {
        /// The requested chunk size in bytes.
        chunk_size_bytes: u32,
        /// The members' sector size in bytes.
        sector_size: u32,
    },
    /// A member's logical sector size differs from the first member's.
    #[error("member {member} has sector size {found}, member 0 has {expected}")]
    SectorSizeMismatch {
        /// The index of the mismatched member.
        member: usize,
        /// The first member's sector size.
        expected: u32,
        /// This member's sector size.
        found: u32,
    },
    /// A member's sector count differs from the first member's.
    #[error("member {member} has {found} sectors, member 0 has {expected}")]
    SectorCountMismatch {
        /// The index of the mismatched member.
        member: usize,
        /// The first member's sector count.
        expected: u64,
        /// This member's sector count.
        found: u64,
    },
    /// A member's read-only flag differs from the first member's.
    #[error("member {member} is {}, member 0 is not", if *.read_only { "read-only" } else { "writable" })]
    ReadOnlyMismatch {
        /// The index of the mismatched member.
        member: usize,
        /// This member's read-only flag.
        read_only: bool,
    },
    /// The size is not a whole number of stripes (one chunk on every member).
    #[error("{sector_count} sectors is not a whole number of stripes of {stripe_sectors} sectors")]
    NotWholeStripes {
        /// The striped disk's size in sectors (requested, or all of the members).
        sector_count: u64,
        /// The sectors of one stripe.
        stripe_sectors: u64,
    },
    /// The requested size exceeds what the members hold together.
    #[error("{requested} sectors requested, the stripe set holds {available}")]
    TooLarge {
        /// The requested sector count.
        requested: u64,
        /// The sectors of all members together.
        available: u64,
    },
}

/// An I/O error of one member disk, with the member's index.
///
/// [`DiskError`] has no field for the member, and its other variants are statuses a
/// frontend maps to protocol codes, so the striped disk adds the index only where an error
/// carries a cause: [`DiskError::Io`] and [`DiskError::MediumError`] are returned with their
/// [`std::io::Error`] wrapped in a `MemberError` (same [`kind`](std::io::Error::kind), the
/// original as [`source`](std::error::Error::source)). Every other variant (`IllegalBlock`,
/// `ReadOnly`, `MemoryAccess`, ...) is returned unchanged. [`failed_member`] reads the
/// index back.
#[derive(Debug, Error)]
#[error("striped member {member} failed")]
pub struct MemberError {
    /// The index of the member disk that failed, in the order given to
    /// [`StripedDisk::new`](crate::StripedDisk::new).
    pub member: usize,
    /// The member's error.
    #[source]
    pub source: std::io::Error,
}

/// The index of the member that caused `error`, if the striped disk recorded it (see
/// [`MemberError`]).
pub fn failed_member(error: &DiskError) -> Option<usize> {
    let io = match error {
        DiskError::Io(io) | DiskError::MediumError(io, _) => io,
        _ => return None,
    };
    io.get_ref()?
        .downcast_ref::<MemberError>()
        .map(|member_error| member_error.member)
}

/// Tags `error` from member `member` with the member's index where the error can carry it.
pub(crate) fn tag_member(member: usize, error: DiskError) -> DiskError {
    let wrap =
        |source: std::io::Error| std::io::Error::new(source.kind(), MemberError { member, source });
    match error {
        DiskError::Io(source) => DiskError::Io(wrap(source)),
        DiskError::MediumError(source, details) => DiskError::MediumError(wrap(source), details),
        other => other,
    }
}

/// The first error of a set of sub-request results, in request order, tagged with its member.
pub(crate) fn first_error(
    results: impl IntoIterator<Item = (usize, Result<(), DiskError>)>,
) -> Result<(), DiskError> {
    for (member, result) in results {
        result.map_err(|error| tag_member(member, error))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::MediumErrorDetails;
    use std::io::ErrorKind;

    #[test]
    fn io_and_medium_errors_carry_the_member() {
        let error = tag_member(3, DiskError::Io(std::io::Error::other("boom")));
        assert_eq!(failed_member(&error), Some(3));
        let DiskError::Io(io) = &error else {
            panic!("variant changed: {error:?}")
        };
        assert_eq!(io.kind(), ErrorKind::Other);
        let source = std::error::Error::source(io.get_ref().unwrap()).unwrap();
        assert_eq!(source.to_string(), "boom");

        let error = tag_member(
            1,
            DiskError::MediumError(
                ErrorKind::InvalidData.into(),
                MediumErrorDetails::UnrecoveredReadError,
            ),
        );
        assert_eq!(failed_member(&error), Some(1));
        assert!(matches!(
            error,
            DiskError::MediumError(ref io, MediumErrorDetails::UnrecoveredReadError)
                if io.kind() == ErrorKind::InvalidData
        ));
    }

    #[test]
    fn statuses_pass_unchanged() {
        let error = tag_member(2, DiskError::ReadOnly);
        assert!(matches!(error, DiskError::ReadOnly));
        assert_eq!(failed_member(&error), None);
        assert_eq!(
            failed_member(&DiskError::Io(std::io::Error::other("plain"))),
            None
        );
    }

    #[test]
    fn first_error_is_in_request_order() {
        let results = vec![
            (0, Ok(())),
            (2, Err(DiskError::Io(std::io::Error::other("first")))),
            (1, Err(DiskError::Io(std::io::Error::other("second")))),
        ];
        assert_eq!(failed_member(&first_error(results).unwrap_err()), Some(2));
        assert!(first_error(vec![(0, Ok(())), (1, Ok(()))]).is_ok());
    }
}
