//! `prwrap(DISK, [host=NAME], [controller=N], [state=PATH])`.

use crate::{DiskWithReservations, InitiatorId};
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};

/// Opens `prwrap` nodes: `DISK` with emulated persistent reservations, as seen by the
/// initiator `host` (default `host0`) / `controller` (default 0). With `state`, the
/// reservation state persists through power loss in that file.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrWrapResolver;

impl ResolveDisk for PrWrapResolver {
    fn kind(&self) -> &str {
        "prwrap"
    }

    fn usage(&self) -> &str {
        "prwrap(DISK, [host=NAME], [controller=N], [state=PATH]): SCSI-3 persistent reservations emulated over DISK"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let host = args.named_text(ctx, "host")?.unwrap_or("host0");
        let controller = args.named_u64(ctx, "controller")?.unwrap_or(0);
        let controller = u16::try_from(controller)
            .map_err(|_| ctx.error(format!("`controller` {controller} does not fit in 16 bits")))?;
        let state = args.named_text(ctx, "state")?;
        let mut disks = args.disks();
        args.finish(ctx)?;
        let (index, inner) = match disks.len() {
            1 => disks.pop().expect("one disk"),
            n => return Err(ctx.error(format!("takes exactly one disk, not {n}"))),
        };
        let inner = ctx.resolve_child(index, &inner)?;
        let wrapper = match state {
            Some(path) => DiskWithReservations::with_state_file(inner, path)
                .map_err(|e| ctx.error_with("cannot load the reservation state", e))?,
            None => DiskWithReservations::new(inner),
        };
        Ok(wrapper.initiator(InitiatorId::new(host.as_bytes(), controller)))
    }
}
