//! The shared conformance suite on an initiator's disk: with registrations but no
//! reservation (nothing may be restricted), and as the holder of an Exclusive Access
//! reservation (the holder may do everything).

use disk_backend::Disk;
use disk_backend::pr::{PersistentReservation, ReservationType};
use disk_conformance::DiskSpec;
use disk_prwrap::{DiskWithReservations, InitiatorDisk, InitiatorId};
use disk_ram::RamDisk;
use futures::executor::block_on;

fn wrapper(spec: &DiskSpec, sector_size: u32) -> DiskWithReservations {
    let ram = RamDisk::new(spec.sector_count, sector_size)
        .unwrap()
        .with_read_only(spec.read_only);
    DiskWithReservations::new(Disk::new(ram).unwrap())
}

/// This initiator and another are registered; nobody holds a reservation.
fn registered_without_reservation(spec: &DiskSpec, sector_size: u32) -> InitiatorDisk {
    let shared = wrapper(spec, sector_size);
    let other = shared.initiator_disk(InitiatorId::new(*b"other", 0));
    let this = shared.initiator_disk(InitiatorId::new(*b"this", 0));
    block_on(async {
        other.register(None, 1, None).await.unwrap();
        this.register(None, 2, None).await.unwrap();
    });
    this
}

/// This initiator holds Exclusive Access; another is registered.
fn exclusive_holder(spec: &DiskSpec) -> InitiatorDisk {
    let this = registered_without_reservation(spec, 512);
    block_on(this.reserve(2, ReservationType::ExclusiveAccess)).unwrap();
    this
}

disk_conformance::conformance_tests!(no_reservation_512, |spec| {
    registered_without_reservation(spec, 512)
});

disk_conformance::conformance_tests!(no_reservation_4k, |spec| {
    registered_without_reservation(spec, 4096)
});

disk_conformance::conformance_tests!(fresh_initiator, |spec| {
    wrapper(spec, 512).initiator_disk(InitiatorId::new(*b"fresh", 3))
});

disk_conformance::conformance_tests!(exclusive_access_holder, |spec| { exclusive_holder(spec) });
