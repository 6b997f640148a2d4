//! The event loop: one `select!` over the client socket, the backend socket, the timers and the
//! kill/drain signals, and what each event does to the buffers. Everything the session decides
//! happens in the frame handlers (`process_client_frames`, `process_backend_frames`); this file
//! only moves bytes and keeps time.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::*;

pub(super) enum Event {
    Timeout(PgError),
    ClientRead(std::io::Result<usize>),
    BackendRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    BackendWrote(std::io::Result<usize>),
    Draining,
    /// The client took none of its pending output for `server.client_write_timeout_ms`.
    ClientStalled,
}

impl Session {
    pub(super) async fn relay(&mut self) -> Result<(), End> {
        loop {
            if let Flow::Terminate = self.process_client_frames().await? {
                return Ok(());
            }
            if self.lease.is_some() && self.backend_clean() && !self.pause.holds_frame() && !self.shared.session_mode {
                self.release().await;
            }
            let between_transactions = self.lease.is_none() || (self.backend_clean() && !self.pause.holds_frame());
            if *self.draining.borrow() && between_transactions && !self.batch.is_open() {
                return Err(End::Fatal(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "pgtenant: terminating connection because the proxy is shutting down",
                )));
            }
            match self.next_event().await {
                Event::ClientRead(Ok(0)) | Event::ClientRead(Err(_)) | Event::ClientWrote(Err(_)) => {
                    return Err(End::ClientGone)
                }
                Event::ClientRead(Ok(n)) => {
                    crate::metrics::hot().client_bytes_in.increment(n as u64);
                    self.client_read_full = n >= self.client_room;
                }
                Event::ClientWrote(Ok(n)) => {
                    crate::metrics::hot().client_bytes_out.increment(n as u64);
                    self.client_out.advance(n);
                    self.write_waiting_since = None; // progress: the clock starts again
                }
                Event::BackendRead(Ok(0)) => return Err(End::BackendLost("server closed the connection".into())),
                Event::BackendRead(Err(e)) | Event::BackendWrote(Err(e)) => {
                    return Err(End::BackendLost(e.to_string()))
                }
                Event::BackendRead(Ok(_)) => self.process_backend_frames()?,
                Event::BackendWrote(Ok(n)) => self.backend_out.advance(n),
                Event::Draining => self.drain_seen = *self.draining.borrow(),
                Event::ClientStalled => {
                    tracing::info!(
                        timeout_ms = self.shared.client_write_timeout.as_millis() as u64,
                        pending = self.client_out.len(),
                        "ending session: the client stopped reading its results (server.client_write_timeout_ms)"
                    );
                    ::metrics::counter!(crate::metrics::CLIENT_WRITE_TIMEOUTS).increment(1);
                    self.client_out.clear(); // it will not read it: no second wait on the way out
                    return Err(End::ClientGone);
                }
                Event::Timeout(err) => {
                    tracing::info!(code = err.code, message = %err.message, "ending session");
                    return Err(End::Fatal(err));
                }
            }
        }
    }

    pub(super) async fn next_event(&mut self) -> Event {
        let event = self.next_io().await;
        self.interrupt_armed = true;
        if self.cancel.slot.is_terminated() {
            return Event::Timeout(crate::sessions::killed_error());
        }
        event
    }

    pub(super) async fn next_io(&mut self) -> Event {
        let holding = match self.pause {
            Pause::No => false,
            Pause::UntilSettled => !self.copy_in_open(),
            Pause::Held(_) => true,
        };
        // while client input waits for the backend, keep reading (bounded) so that a client that
        // leaves is noticed at once: its backend must not stay pinned
        let read_client = if holding {
            self.client_in.len() < HIGH_WATER
        } else {
            self.backend_out.len() < HIGH_WATER && self.client_out.len() < HIGH_WATER
        };
        let timeout = self.next_timeout();
        let stall_deadline = self.write_deadline();
        let read_backend = self.client_out.len() < HIGH_WATER;
        // An idle client (no backend, nothing buffered) waits with a small read buffer, and so
        // does one in a transaction until a read fills it: most transactions' messages fit, and
        // growing the buffer for each transaction (then dropping it again at the release, to keep
        // idle clients small) cost an allocation and a copy per transaction.
        let big = !self.client_in.is_empty() || (self.lease.is_some() && self.client_read_full);
        self.client_in.reserve(if big { READ_CHUNK } else { IDLE_READ_CHUNK });
        self.client_room = self.client_in.capacity() - self.client_in.len();
        if self.lease.is_some() {
            self.backend_in.reserve(READ_CHUNK);
        }
        let (brd, bwr) = match &mut self.lease {
            Some(l) => (Some(&mut l.backend.rd), Some(&mut l.backend.wr)),
            None => (None, None),
        };
        let has_backend = brd.is_some();
        let armed = self.interrupt_armed;
        let (deadline, timeout_kind) = match timeout {
            Some((at, kind)) => (Some(at), Some(kind)),
            None => (None, None),
        };
        tokio::select! {
            biased;
            // first, so that it is polled (and its waits registered) before any event arms it
            _ = &mut self.interrupt, if !armed => Event::Draining, // a kill: sorted out in next_event
            // every turn: a drain does not complete the future above, it only wakes the session
            _ = std::future::poll_fn(|_| interrupted(&self.cancel.slot, &self.draining, self.drain_seen)) => Event::Draining,
            _ = sleep_until_opt(deadline), if deadline.is_some() => Event::Timeout(timeout_kind.expect("set with the deadline").error(&self.shared.pool_cfg)),
            r = self.client_wr.write(&self.client_out), if !self.client_out.is_empty() => Event::ClientWrote(r),
            r = write_opt(bwr, &self.backend_out), if has_backend && !self.backend_out.is_empty() => Event::BackendWrote(r),
            r = read_opt(brd, &mut self.backend_in), if has_backend && read_backend => Event::BackendRead(r),
            r = self.client_rd.read_buf(&mut self.client_in), if read_client => Event::ClientRead(r),
            // last: the timer is only armed when no I/O is ready, so the hot path never sets one
            _ = sleep_until_opt(stall_deadline), if stall_deadline.is_some() => Event::ClientStalled,
        }
    }

    /// When pending output to the client must have made progress (`server.client_write_timeout_ms`).
    pub(super) fn write_deadline(&mut self) -> Option<tokio::time::Instant> {
        if self.client_out.is_empty() {
            self.write_waiting_since = None;
            return None;
        }
        let since = *self.write_waiting_since.get_or_insert_with(std::time::Instant::now);
        Some(tokio::time::Instant::from_std(since + self.shared.client_write_timeout))
    }

    /// The nearest proxy-side timeout of the transaction on this session's backend, if any. Runs on
    /// every turn of the event loop: the error is only built when the timeout fires.
    pub(super) fn next_timeout(&self) -> Option<(tokio::time::Instant, Timeout)> {
        self.lease.as_ref()?;
        let pool = &self.shared.pool_cfg;
        [
            (self.tx_since, pool.transaction_timeout_ms, Timeout::Transaction),
            (self.idle_since, pool.idle_in_transaction_timeout_ms, Timeout::IdleInTransaction),
        ]
        .into_iter()
        .filter_map(|(since, ms, kind)| Some((since? + std::time::Duration::from_millis(ms), kind)).filter(|_| ms > 0))
        .min_by_key(|(at, _)| *at)
        .map(|(at, kind)| (tokio::time::Instant::from_std(at), kind))
    }

}

/// The proxy-side limits on how long a client may hold a backend (`[pool]`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Timeout {
    Transaction,
    IdleInTransaction,
}

impl Timeout {
    pub(super) fn error(self, pool: &crate::config::PoolConfig) -> PgError {
        match self {
            Timeout::Transaction => PgError::fatal(
                sqlstate::TRANSACTION_TIMEOUT,
                format!("pgtenant: terminating connection due to transaction timeout ({} ms)", pool.transaction_timeout_ms),
            )
            .with_hint("the transaction was rolled back; raise pool.transaction_timeout_ms in the pgtenant config if it must run longer"),
            Timeout::IdleInTransaction => PgError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                format!("pgtenant: terminating connection due to idle-in-transaction timeout ({} ms)", pool.idle_in_transaction_timeout_ms),
            )
            .with_hint("the transaction was rolled back; end transactions promptly, or raise pool.idle_in_transaction_timeout_ms"),
        }
    }
}

/// Ready once the session was killed, or the proxy started draining and the session has not
/// seen it yet: the flags that `Session::interrupt` wakes the session for.
pub(super) fn interrupted(slot: &crate::cancel::CancelSlot, draining: &tokio::sync::watch::Receiver<bool>, drain_seen: bool) -> std::task::Poll<()> {
    if slot.is_terminated() || (!drain_seen && *draining.borrow()) {
        std::task::Poll::Ready(())
    } else {
        std::task::Poll::Pending
    }
}

pub(super) type Interruption = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// Wakes the session when it is killed (console `KILL`, `/sessions` DELETE) or the proxy starts
/// draining; what happened is read from the flags (see `Session::interrupt`). It completes only on
/// a kill: were a drain to complete it (a drain under way when the session first polls it, or one
/// that comes before the session's first event), the wait for a kill would end with it, and a
/// session then kept open by its transaction could no longer be killed.
pub(super) fn interruption(slot: Arc<crate::cancel::CancelSlot>, mut draining: tokio::sync::watch::Receiver<bool>) -> Interruption {
    Box::pin(async move {
        let drained = async move {
            let _ = draining.wait_for(|d| *d).await; // wakes the session once; `interrupted` sees why
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = slot.terminated() => {}
            _ = drained => {}
        }
    })
}

pub(super) async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn read_opt<R: AsyncRead + Unpin>(r: Option<&mut R>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn write_opt<W: AsyncWrite + Unpin>(w: Option<&mut W>, buf: &[u8]) -> std::io::Result<usize> {
    match w {
        Some(w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}
