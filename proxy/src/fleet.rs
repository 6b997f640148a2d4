//! A fleet of pgtenant instances behind one address: cancel requests find the instance that owns
//! the session.
//!
//! A load balancer sends a client's CancelRequest on a new connection, so it may reach any
//! instance, not the one the client is logged in to. With `server.peer_id` set, every cancel key an
//! instance issues names it: the secret key's bits 24 to 30 carry the instance id, bit 31 marks a
//! forwarded request, and bits 0 to 23 are random (the pid is untouched: in session mode it is the
//! backend's real pid). An instance answers a key naming itself from its own sessions, forwards a
//! key naming another instance to that peer (`[peers]`, a plain TCP CancelRequest, as libpq sends
//! one) with the forwarded bit set, and drops the rest: a key naming an instance it has no address
//! for, and a forwarded key that does not name itself, so a request is forwarded at most once and
//! a misconfigured `[peers]` table cannot make two instances bounce it between them. The random
//! part of the key is matched, in constant time, only by its owner.
//!
//! Without `server.peer_id` the secret is 32 random bits and nothing is forwarded (one instance).

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Instance ids `server.peer_id` and `[peers]` may use (7 bits of the secret key).
pub const PEER_IDS: RangeInclusive<u32> = 1..=127;
/// The secret key's bits that carry the instance id.
const PEER_SHIFT: u32 = 24;
const PEER_MASK: u32 = 0x7f << PEER_SHIFT;
/// Set on a request one instance forwarded to another: it is never forwarded again.
const FORWARDED: u32 = 1 << 31;
/// Longest a forward to a peer may take (connect, send, the peer closing).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A CancelRequest's message code (protocol 1234.5678).
const CANCEL_REQUEST_CODE: i32 = 80877102;

/// Where a cancel request goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// One of this instance's sessions, if any matches this secret.
    Local(i32),
    /// Another instance, at `addr`: forward the request there, with this secret (marked as
    /// forwarded).
    Peer { id: u8, addr: String, secret: i32 },
    /// Nobody: a key naming an unknown instance, or a forwarded key that names another one.
    Drop(&'static str),
}

/// This instance's id and the addresses of the others.
pub struct Fleet {
    me: Option<u8>,
    peers: RwLock<Arc<BTreeMap<u8, String>>>,
}

impl Fleet {
    /// `me` is `server.peer_id` (checked by the config), `peers` the other instances.
    pub fn new(me: Option<u8>, peers: BTreeMap<u8, String>) -> Fleet {
        Fleet { me, peers: RwLock::new(Arc::new(peers)) }
    }

    /// This instance's id, when it is part of a fleet.
    pub fn peer_id(&self) -> Option<u8> {
        self.me
    }

    /// New peer addresses (config reload).
    pub fn set_peers(&self, peers: BTreeMap<u8, String>) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(peers);
    }

    fn peers(&self) -> Arc<BTreeMap<u8, String>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn route(&self, secret: i32) -> Route {
        let Some(me) = self.me else { return Route::Local(secret) };
        let bits = secret as u32;
        let owner = ((bits & PEER_MASK) >> PEER_SHIFT) as u8;
        let forwarded = bits & FORWARDED != 0;
        if owner == me {
            return Route::Local((bits & !FORWARDED) as i32);
        }
        if forwarded {
            return Route::Drop("a forwarded cancel request names another instance");
        }
        match self.peers().get(&owner) {
            Some(addr) => Route::Peer { id: owner, addr: addr.clone(), secret: (bits | FORWARDED) as i32 },
            None => Route::Drop("a cancel request names an instance missing from [peers]"),
        }
    }

    /// Handles a CancelRequest: cancels this instance's matching session, or forwards the request
    /// to the instance that owns it, or drops it. `local(secret)` cancels this instance's session
    /// with `pid` and that secret (the key as this instance issued it) and says whether a cancel
    /// went to a backend: the server passes `CancelRegistry::cancel`, so this module, whose key
    /// layout the registry uses, does not depend on it.
    pub async fn cancel<F: Future<Output = bool>>(&self, pid: i32, secret: i32, local: impl FnOnce(i32) -> F) {
        let result = match self.route(secret) {
            Route::Local(secret) => {
                if local(secret).await {
                    "cancelled"
                } else {
                    "unmatched"
                }
            }
            Route::Peer { id, addr, secret } => {
                match forward(&addr, pid, secret).await {
                    Ok(()) => {
                        tracing::debug!(peer_id = id, peer = %addr, "cancel request forwarded");
                        "forwarded"
                    }
                    Err(e) => {
                        tracing::warn!(peer_id = id, peer = %addr, error = %e, "forwarding a cancel request to a peer failed");
                        "forward_failed"
                    }
                }
            }
            Route::Drop(why) => {
                tracing::info!("{why}: ignored");
                "dropped"
            }
        };
        ::metrics::counter!(crate::metrics::CANCEL_REQUESTS, "result" => result).increment(1);
    }
}

/// The secret key of a new session: `random`, with the instance id in its bits when there is one.
pub fn secret_for(me: Option<u8>, random: u32) -> i32 {
    match me {
        Some(id) => ((random & !(PEER_MASK | FORWARDED)) | ((id as u32) << PEER_SHIFT)) as i32,
        None => random as i32,
    }
}

/// Sends a CancelRequest for (pid, secret) to a peer's client listener, as libpq does, and waits
/// for the peer to close the connection.
async fn forward(addr: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut msg = Vec::with_capacity(16);
        for n in [16, CANCEL_REQUEST_CODE, pid, secret] {
            msg.extend_from_slice(&n.to_be_bytes());
        }
        stream.write_all(&msg).await?;
        let mut sink = [0u8; 16];
        let _ = stream.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(FORWARD_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel forward timed out")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(me: u8) -> Fleet {
        Fleet::new(Some(me), BTreeMap::from([(2, "127.0.0.1:1".to_string())]))
    }

    #[test]
    fn keys_name_their_instance_and_keep_24_random_bits() {
        for random in [0u32, u32::MAX, 0x1234_5678] {
            let s = secret_for(Some(5), random) as u32;
            assert_eq!((s & PEER_MASK) >> PEER_SHIFT, 5);
            assert_eq!(s & FORWARDED, 0);
            assert_eq!(s & 0x00ff_ffff, random & 0x00ff_ffff);
        }
        assert_eq!(secret_for(None, 0xdead_beef), 0xdead_beef_u32 as i32);
    }

    #[test]
    fn routes_local_peer_forwarded_and_unknown() {
        let f = fleet(1);
        let mine = secret_for(Some(1), 0xabcdef);
        assert_eq!(f.route(mine), Route::Local(mine));
        // a request forwarded to its owner is matched without the mark
        assert_eq!(f.route(((mine as u32) | FORWARDED) as i32), Route::Local(mine));
        let theirs = secret_for(Some(2), 0xabcdef);
        let addr = "127.0.0.1:1".to_string();
        assert_eq!(f.route(theirs), Route::Peer { id: 2, addr, secret: ((theirs as u32) | FORWARDED) as i32 });
        // forwarded once already: never again, even to a known peer
        assert!(matches!(f.route(((theirs as u32) | FORWARDED) as i32), Route::Drop(_)));
        assert!(matches!(f.route(secret_for(Some(3), 7)), Route::Drop(_)));
        // one instance: the whole secret is matched locally
        assert_eq!(Fleet::new(None, BTreeMap::new()).route(theirs), Route::Local(theirs));
    }
}
