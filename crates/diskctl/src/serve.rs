//! `diskctl serve`: a vhost-user-blk export of a stack until SIGINT or SIGTERM.

use crate::stack;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use vhost_user_blk::{Event, Server, SessionEnd};
use virtio_block::BlockConfig;

/// Serves `spec` on `socket` until a signal asks to stop; then the connection is ended after
/// its requests in flight and the disk is flushed.
///
/// `poll_max` is the longest poll window of the queue threads ([`Server::set_poll_max`]).
pub fn serve(
    socket: &Path,
    spec: Option<&str>,
    config: BlockConfig,
    poll_max: Duration,
) -> Result<(), String> {
    let stack = stack::open(spec)?;
    let read_only = config.read_only || stack.disk.is_read_only();
    let mut server =
        Server::bind(socket, stack.disk.clone(), config).map_err(|e| stack::error_chain(&e))?;
    server.set_poll_max(poll_max);
    // The signal handler writes a byte to the pair; the server polls the other end.
    let (stop_reader, stop_writer) =
        UnixStream::pair().map_err(|e| format!("cannot create the stop channel: {e}"))?;
    for signal in [SIGINT, SIGTERM] {
        let writer = stop_writer
            .try_clone()
            .map_err(|e| format!("cannot create the stop channel: {e}"))?;
        signal_hook::low_level::pipe::register(signal, writer)
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }
    eprintln!(
        "diskctl: serving {} ({} sectors of {} bytes{}) on {}",
        stack.spec,
        stack.disk.sector_count(),
        stack.disk.sector_size(),
        if read_only { ", read-only" } else { "" },
        socket.display()
    );
    server
        .run(stop_reader.as_fd(), |event| match event {
            Event::Connected => eprintln!("diskctl: frontend connected"),
            Event::Disconnected(SessionEnd::Closed) => {
                eprintln!("diskctl: frontend disconnected")
            }
            Event::Disconnected(SessionEnd::Stopped) => {
                eprintln!("diskctl: stopping: requests in flight completed")
            }
            Event::Disconnected(SessionEnd::Failed { request, error }) => eprintln!(
                "diskctl: connection closed: {}{}",
                request.map_or(String::new(), |r| format!("request {r}: ")),
                stack::error_chain(&error)
            ),
            Event::FlushFailed(e) => {
                eprintln!("diskctl: flush failed: {}", stack::error_chain(&e))
            }
        })
        .map_err(|e| stack::error_chain(&e))?;
    eprintln!("diskctl: stopped, disk flushed");
    Ok(())
}
