//! The attached backend: leasing one for a transaction, adopting it (the reset it owes this
//! session goes in front of the first message), giving it back once it is idle and clean, and
//! closing it when the client leaves it mid-transaction.

use super::*;

impl Session {
    /// At the session's end: a clean backend goes back to the pool (reset first in session mode);
    /// one in a transaction or mid-reply is closed, which makes the server roll back.
    pub(super) async fn let_backend_go(&mut self, end: &End) {
        self.cancel.slot.set(None).await;
        if self.lease.is_none() {
            return;
        }
        if self.backend_clean() && !matches!(end, End::BackendLost(_)) {
            if self.shared.session_mode {
                // a whole session ran here: reset everything before anyone else uses it
                if let Some(l) = self.lease.as_mut() {
                    l.backend.end_session();
                }
            }
            self.release().await;
        } else {
            tracing::debug!("closing a backend that was not idle when its client left");
            self.lease = None;
        }
    }

    /// The server is in COPY FROM STDIN and waits for the client's data (nothing held back).
    pub(super) fn copy_in_open(&self) -> bool {
        self.replies.copy_in && !self.pause.holds_frame() && self.lease.is_some()
    }

    /// The backend can go back to the pool: idle, nothing in flight, nothing half-read.
    pub(super) fn backend_clean(&self) -> bool {
        self.backend_idle() && self.backend_out.is_empty() && self.backend_in.is_empty() && self.stream_left == 0
    }

    /// Between transactions on the backend: every reply in, status idle, no batch open. The one
    /// definition of "idle" (the guard's position and the pool hand-back both use it).
    pub(super) fn backend_idle(&self) -> bool {
        self.replies.is_settled() && self.replies.status == b'I' && !self.batch.is_open()
    }

    pub(super) async fn release(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            // what this backend owes is owed to whoever attaches it next (`reset_for`); released
            // idle, the server has dropped its portals
            if std::mem::take(&mut self.debts).seq_reset != SeqReset::None {
                lease.backend.reset_unconfirmed(); // owed or unanswered: the next session gets it
            }
            // the relay buffers go back with the connection (both are empty: backend_clean)
            std::mem::swap(&mut self.backend_in, &mut lease.backend.buf_in);
            std::mem::swap(&mut self.backend_out, &mut lease.backend.buf_out);
            // an idle client keeps no large buffers: 10,000 idle clients must stay small
            if self.client_out.is_empty() && self.client_out.capacity() > IDLE_READ_CHUNK {
                self.client_out = BytesMut::new();
            }
            if self.client_in.is_empty() && self.client_in.capacity() > IDLE_READ_CHUNK {
                self.client_in = BytesMut::new();
            }
            let hot = crate::metrics::hot();
            hot.transactions.increment(1);
            hot.transaction_seconds.record(self.attached_at.elapsed().as_secs_f64());
            self.cancel.slot.set(None).await;
            self.pool.release(lease);
        }
    }

    /// Leases a backend for the transaction a message starts; `access` is the mode its first
    /// statement opens the transaction with, if it names one.
    pub(super) async fn attach(&mut self, access: Option<crate::routing::intent::Mode>) -> Result<(), PgError> {
        // boxed: leasing (queueing, connecting, logging in to the server) is the session's largest
        // stage, and inline it would size every idle session's task
        let lease = Box::pin(self.lease_for(access)).await?;
        self.cancel.slot.set_on(Some((lease.backend.pid, lease.backend.secret_key)), self.pool.clone()).await;
        self.adopt(lease);
        Ok(())
    }

    /// Makes `lease` this session's backend.
    pub(super) fn adopt(&mut self, mut lease: Lease) {
        self.attached_at = std::time::Instant::now();
        self.replies.reset();
        let b = &mut lease.backend;
        // borrow the connection's relay buffers (ours are empty whenever no lease is held)
        debug_assert!(self.backend_in.is_empty() && self.backend_out.is_empty());
        std::mem::swap(&mut self.backend_in, &mut b.buf_in);
        std::mem::swap(&mut self.backend_out, &mut b.buf_out);
        self.lease = Some(lease);
        self.unnamed_parsed = None;
        self.unnamed_parses.clear();
        self.send_reset();
    }

    /// Sends the reset the attached backend owes this session, if any, in front of the message
    /// about to go (at a batch's start: nothing before it can make the server skip it).
    pub(super) fn send_reset(&mut self) {
        let Some(l) = self.lease.as_mut() else { return };
        match l.backend.reset_for(self.id) {
            None => {}
            // sent with the first message (`send_seq_reset`): in the same batch as the context
            // when one goes in front of it
            Some(crate::pool::Reset::Sequences) => self.debts.seq_reset = SeqReset::Owed,
            Some(reset) => {
                // pipelined in front of this session's first message: no extra round trip
                build::query(&mut self.backend_out, &reset.into_sql());
                self.replies.expect(Want::Ready, true, true);
            }
        }
    }

    /// Sends the sequence reset the backend owes, if any: in the batch of the context statement
    /// that follows (`in_batch`), else as a Query of its own. Either way it goes ahead of every
    /// client message, and the backend counts as reset once the server confirms it ran.
    pub(super) fn send_seq_reset(&mut self, in_batch: bool) {
        if self.debts.seq_reset != SeqReset::Owed {
            return;
        }
        let Some(l) = self.lease.as_mut() else { return };
        if in_batch {
            inject::write_sequence_reset(&mut self.backend_out, &mut l.backend, &mut self.replies);
        } else {
            build::query(&mut self.backend_out, crate::pool::conn::RESET_SEQUENCES);
            self.replies.expect(Want::Ready, true, true);
        }
        self.debts.seq_reset = SeqReset::Sent;
    }

    /// The first CommandComplete or ErrorResponse after a sequence reset went out is the reset's:
    /// an error means it did not run (a cancel can land on it), and it is owed again, by this
    /// session's next transaction as much as by anyone's (it protects this session from the one
    /// before it): sent with the next message here, or on the next hand-over of the backend.
    pub(super) fn confirm_seq_reset(&mut self, tag: u8) {
        if self.debts.seq_reset == SeqReset::Sent && (tag == tags::backend::COMMAND_COMPLETE || tag == tags::backend::ERROR) {
            self.debts.seq_reset = if tag == tags::backend::ERROR { SeqReset::Owed } else { SeqReset::None };
        }
    }
}

/// What the attached backend owes this session before the client's next message runs on it: state
/// pgtenant puts right that the client never asked for, each sent in front of a client message
/// (no round trip of its own). All of it belongs to the backend and is dropped when the backend
/// is released: the pool hands the backend's own debts to the next session (`reset_for`).
#[derive(Debug, Default)]
pub(super) struct Debts {
    /// The sequence reset the backend owes before this session's first statement on it.
    pub(super) seq_reset: SeqReset,
    /// The server skipped a reset of the attached backend (`Replies::own_query_skipped`): it goes
    /// again before the next batch.
    pub(super) reset: bool,
    /// A simple Query went out since the server's unnamed portal was last known to be gone: the
    /// portal the server may keep from it is closed in front of the client's next message (see
    /// `close_query_portal`).
    pub(super) query_portal: bool,
}

/// A sequence reset a newly attached backend owes this session (see `inject::RESET_STATEMENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum SeqReset {
    #[default]
    None,
    /// Not sent yet: it goes out with the session's first message.
    Owed,
    /// Sent; its CommandComplete (or error) has not arrived yet.
    Sent,
}
