//! Persistent reservations through the Linux `IOC_PR_*` ioctls (`linux/pr.h`).
//!
//! The kernel passes these to the device's driver (SCSI disks, NVMe namespaces, some
//! multipath and virtual devices); devices without `pr_ops` (loop devices, for one) answer
//! `EOPNOTSUPP`, and [`probe`] tells them apart at open without changing any state.

use crate::sys;
use disk_backend::DiskError;
use disk_backend::pr::{
    PersistentReservation, ReservationCapabilities, ReservationReport, ReservationType,
};
use std::fs::File;
use std::io;
use std::sync::Arc;

/// `_IOW('p', nr, size)`.
const fn iow(nr: u8, size: usize) -> u64 {
    sys::ioc(sys::IOC_WRITE, b'p', nr, size)
}

/// `struct pr_registration`.
#[repr(C)]
struct PrRegistration {
    old_key: u64,
    new_key: u64,
    flags: u32,
    pad: u32,
}

/// `struct pr_reservation`.
#[repr(C)]
struct PrReservation {
    key: u64,
    kind: u32,
    flags: u32,
}

/// `struct pr_preempt`.
#[repr(C)]
struct PrPreempt {
    old_key: u64,
    new_key: u64,
    kind: u32,
    flags: u32,
}

/// `struct pr_clear`.
#[repr(C)]
struct PrClear {
    key: u64,
    flags: u32,
    pad: u32,
}

pub(crate) const IOC_PR_REGISTER: u64 = iow(200, size_of::<PrRegistration>());
pub(crate) const IOC_PR_RESERVE: u64 = iow(201, size_of::<PrReservation>());
pub(crate) const IOC_PR_RELEASE: u64 = iow(202, size_of::<PrReservation>());
pub(crate) const IOC_PR_PREEMPT: u64 = iow(203, size_of::<PrPreempt>());
pub(crate) const IOC_PR_PREEMPT_ABORT: u64 = iow(204, size_of::<PrPreempt>());
pub(crate) const IOC_PR_CLEAR: u64 = iow(205, size_of::<PrClear>());

/// `PR_FL_IGNORE_KEY`: register without checking the current key.
const PR_FL_IGNORE_KEY: u32 = 1;

/// `PR_STS_RESERVATION_CONFLICT`: what newer kernels return (as a positive value) instead
/// of `-EBADE` when the device reports a conflict.
const PR_STS_RESERVATION_CONFLICT: i32 = 0x18;

/// Whether the device behind `file` implements persistent reservations. `IOC_PR_REGISTER`
/// with a null argument is harmless: a device without reservation support answers
/// `EOPNOTSUPP` (or `ENOTTY` for a non-device), one with it fails to read the argument
/// (`EFAULT`) before doing anything.
pub(crate) fn probe(file: &File) -> bool {
    // SAFETY: a null argument is never dereferenced by a successful path: the kernel's
    // copy_from_user fails with EFAULT before any state changes.
    let result = unsafe { sys::ioctl(file, IOC_PR_REGISTER, std::ptr::null_mut()) };
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EFAULT))
}

/// Maps the outcome of a `IOC_PR_*` ioctl: `EBADE` (or the positive
/// `PR_STS_RESERVATION_CONFLICT`) is a reservation conflict; `EOPNOTSUPP`/`ENOTTY` mean the
/// device has no reservations; other positive values are device status codes.
pub(crate) fn map_result(result: io::Result<i32>) -> Result<(), DiskError> {
    match result {
        Ok(0) => Ok(()),
        Ok(PR_STS_RESERVATION_CONFLICT) => Err(DiskError::ReservationConflict),
        Ok(status) => Err(DiskError::Io(io::Error::other(format!(
            "persistent reservation failed with device status {status:#x}"
        )))),
        Err(e) => match e.raw_os_error() {
            Some(libc::EBADE) => Err(DiskError::ReservationConflict),
            Some(libc::EOPNOTSUPP | libc::ENOTTY) => {
                Err(DiskError::Io(io::Error::new(io::ErrorKind::Unsupported, e)))
            }
            Some(libc::EINVAL) => Err(DiskError::InvalidInput),
            _ => Err(DiskError::Io(e)),
        },
    }
}

/// The `enum pr_type` value of a reservation type.
pub(crate) fn pr_type(reservation_type: ReservationType) -> u32 {
    match reservation_type {
        ReservationType::WriteExclusive => 1,
        ReservationType::ExclusiveAccess => 2,
        ReservationType::WriteExclusiveRegistrantsOnly => 3,
        ReservationType::ExclusiveAccessRegistrantsOnly => 4,
        ReservationType::WriteExclusiveAllRegistrants => 5,
        ReservationType::ExclusiveAccessAllRegistrants => 6,
    }
}

/// Persistent reservations of a block device, issued through ioctls on a blocking thread
/// (a device may take a while to answer).
#[derive(Debug)]
pub(crate) struct DevicePr {
    file: Arc<File>,
}

impl DevicePr {
    pub(crate) fn new(file: Arc<File>) -> Self {
        Self { file }
    }

    async fn ioctl<T: Send + 'static>(&self, request: u64, mut arg: T) -> Result<(), DiskError> {
        let file = self.file.clone();
        let result = blocking::unblock(move || {
            // SAFETY: every caller passes the `repr(C)` struct `request` is defined with;
            // it lives on this closure's stack for the duration of the call.
            unsafe { sys::ioctl(&file, request, (&raw mut arg).cast()) }
        })
        .await;
        map_result(result)
    }
}

#[async_trait::async_trait]
impl PersistentReservation for DevicePr {
    fn capabilities(&self) -> ReservationCapabilities {
        // The ioctl interface cannot ask the device which types it supports, nor set
        // Persist Through Power Loss.
        ReservationCapabilities {
            write_exclusive: true,
            exclusive_access: true,
            write_exclusive_registrants_only: true,
            exclusive_access_registrants_only: true,
            write_exclusive_all_registrants: true,
            exclusive_access_all_registrants: true,
            persist_through_power_loss: false,
        }
    }

    async fn report(&self) -> Result<ReservationReport, DiskError> {
        // The kernel's `IOC_PR_*` interface has no command that reads the state.
        Err(DiskError::Io(io::Error::new(
            io::ErrorKind::Unsupported,
            "the Linux persistent reservation ioctls cannot report the reservation state",
        )))
    }

    async fn register(
        &self,
        current_key: Option<u64>,
        new_key: u64,
        ptpl: Option<bool>,
    ) -> Result<(), DiskError> {
        if ptpl == Some(true) {
            return Err(DiskError::InvalidInput);
        }
        let arg = PrRegistration {
            old_key: current_key.unwrap_or(0),
            new_key,
            flags: if current_key.is_none() {
                PR_FL_IGNORE_KEY
            } else {
                0
            },
            pad: 0,
        };
        self.ioctl(IOC_PR_REGISTER, arg).await
    }

    async fn reserve(&self, key: u64, reservation_type: ReservationType) -> Result<(), DiskError> {
        let arg = PrReservation {
            key,
            kind: pr_type(reservation_type),
            flags: 0,
        };
        self.ioctl(IOC_PR_RESERVE, arg).await
    }

    async fn release(&self, key: u64, reservation_type: ReservationType) -> Result<(), DiskError> {
        let arg = PrReservation {
            key,
            kind: pr_type(reservation_type),
            flags: 0,
        };
        self.ioctl(IOC_PR_RELEASE, arg).await
    }

    async fn clear(&self, key: u64) -> Result<(), DiskError> {
        self.ioctl(
            IOC_PR_CLEAR,
            PrClear {
                key,
                flags: 0,
                pad: 0,
            },
        )
        .await
    }

    async fn preempt(
        &self,
        current_key: u64,
        preempt_key: u64,
        reservation_type: ReservationType,
        abort: bool,
    ) -> Result<(), DiskError> {
        let arg = PrPreempt {
            old_key: current_key,
            new_key: preempt_key,
            kind: pr_type(reservation_type),
            flags: 0,
        };
        let request = if abort {
            IOC_PR_PREEMPT_ABORT
        } else {
            IOC_PR_PREEMPT
        };
        self.ioctl(request, arg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_pr_h() {
        // Values of the `_IOW('p', ...)` macros on x86-64.
        assert_eq!(IOC_PR_REGISTER, 0x4018_70c8);
        assert_eq!(IOC_PR_RESERVE, 0x4010_70c9);
        assert_eq!(IOC_PR_RELEASE, 0x4010_70ca);
        assert_eq!(IOC_PR_PREEMPT, 0x4018_70cb);
        assert_eq!(IOC_PR_PREEMPT_ABORT, 0x4018_70cc);
        assert_eq!(IOC_PR_CLEAR, 0x4010_70cd);
    }

    #[test]
    fn results_map_to_disk_errors() {
        let errno = |e| map_result(Err(io::Error::from_raw_os_error(e)));
        assert!(map_result(Ok(0)).is_ok());
        assert!(matches!(
            errno(libc::EBADE),
            Err(DiskError::ReservationConflict)
        ));
        assert!(matches!(
            map_result(Ok(PR_STS_RESERVATION_CONFLICT)),
            Err(DiskError::ReservationConflict)
        ));
        assert!(matches!(
            errno(libc::EOPNOTSUPP),
            Err(DiskError::Io(e)) if e.kind() == io::ErrorKind::Unsupported
        ));
        assert!(matches!(
            errno(libc::ENOTTY),
            Err(DiskError::Io(e)) if e.kind() == io::ErrorKind::Unsupported
        ));
        assert!(matches!(errno(libc::EINVAL), Err(DiskError::InvalidInput)));
        assert!(matches!(
            errno(libc::EIO),
            Err(DiskError::Io(e)) if e.raw_os_error() == Some(libc::EIO)
        ));
        assert!(matches!(map_result(Ok(2)), Err(DiskError::Io(_))));
    }

    #[test]
    fn reservation_types_use_the_kernel_numbering() {
        let numbers: Vec<u32> = ReservationType::ALL.into_iter().map(pr_type).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);
    }
}
