//! The future of one ring operation.

use super::op::Target;
use super::{Op, Owned, Ring};
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The future of one ring operation; see [`Ring::run`].
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub(super) ring: RingRef<'a>,
    /// The file it is on.
    pub(super) target: Target,
    pub(super) stage: Stage,
}

/// The ring a request runs on: its disk's, which outlives the request's borrow of the disk,
/// or a thread's, which the request keeps alive (the thread may end first).
#[derive(Debug)]
pub(super) enum RingRef<'a> {
    Disk(&'a Ring),
    Thread(Arc<Ring>),
}

impl Deref for RingRef<'_> {
    type Target = Ring;

    fn deref(&self) -> &Ring {
        match self {
            RingRef::Disk(ring) => ring,
            RingRef::Thread(ring) => ring,
        }
    }
}

#[derive(Debug)]
pub(super) enum Stage {
    Queued {
        op: Op,
        owned: Owned,
        skip: usize,
        /// May name a fixed buffer (not on the retry after `EFAULT`).
        fixed: bool,
    },
    /// Pushed into a batch that may not be submitted yet.
    Batched(Pushed),
    InFlight(Pushed),
    Finished,
}

/// A request whose entry is pushed: its slot, its position in the submission queue, and
/// what a retry needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pushed {
    pub(super) index: u32,
    pub(super) position: u64,
    pub(super) op: Op,
    pub(super) skip: usize,
}

impl Future for Request<'_> {
    type Output = (io::Result<u32>, Owned);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.stage, Stage::Finished) {
            Stage::Queued {
                op,
                owned,
                skip,
                fixed,
            } => {
                match this
                    .ring
                    .start(this.target, op, owned, skip, fixed, cx.waker())
                {
                    // The entry does not enter the kernel yet: the request asks to be
                    // polled again, so that the requests the executor polls meanwhile (the
                    // rest of a queue refill) join the batch; the first of them polled again
                    // submits them all with one `io_uring_enter`, the others find their
                    // entries taken. Every request answers for its own entry rather than
                    // leaving it to another: a caller may hold the first without polling it
                    // (a future kept across a `select!` loop) while it awaits the others, and
                    // a submitter may fail, or be dropped, after another request left its
                    // entry to it.
                    Ok((index, position, batched)) => {
                        let pushed = Pushed {
                            index,
                            position,
                            op,
                            skip,
                        };
                        if batched {
                            this.stage = Stage::Batched(pushed);
                            cx.waker().wake_by_ref();
                        } else {
                            this.stage = Stage::InFlight(pushed);
                        }
                    }
                    Err(owned) => {
                        this.stage = Stage::Queued {
                            op,
                            owned,
                            skip,
                            fixed,
                        }
                    }
                }
                Poll::Pending
            }
            Stage::Batched(pushed) => {
                // Nothing to do if another request submitted the batch already.
                this.ring.submit_batch();
                if !this.ring.taken(pushed.position) {
                    // Another thread is submitting, or the kernel refused the entry for now:
                    // look again on the next poll, which nothing else may bring.
                    this.stage = Stage::Batched(pushed);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                this.stage = Stage::InFlight(pushed);
                Pin::new(this).poll(cx)
            }
            Stage::InFlight(pushed) => match this.ring.poll_slot(pushed.index, cx.waker()) {
                // The buffer an entry names is looked up when the kernel takes the entry:
                // one queued across a new registration may find other memory there and
                // fail. Once more without a fixed buffer.
                Poll::Ready((result, owned, true)) if result == -libc::EFAULT => {
                    this.stage = Stage::Queued {
                        op: pushed.op,
                        owned,
                        skip: pushed.skip,
                        fixed: false,
                    };
                    Pin::new(this).poll(cx)
                }
                Poll::Ready((result, owned, _)) => {
                    let result = if result < 0 {
                        Err(io::Error::from_raw_os_error(-result))
                    } else {
                        Ok(result as u32)
                    };
                    Poll::Ready((result, owned))
                }
                Poll::Pending => {
                    this.stage = Stage::InFlight(pushed);
                    Poll::Pending
                }
            },
            Stage::Finished => panic!("request polled after completion"),
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        match self.stage {
            Stage::Batched(pushed) => {
                // The batch may still hold this entry, and other requests' entries.
                self.ring.submit_batch();
                self.ring.abandon(pushed.index);
            }
            Stage::InFlight(pushed) => self.ring.abandon(pushed.index),
            Stage::Queued { .. } | Stage::Finished => {}
        }
    }
}
