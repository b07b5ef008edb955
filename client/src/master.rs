//! The connection to the master group: finds the leader, follows "not leader, try X" hints, and
//! retries with bounded exponential backoff and jitter until an overall deadline, which ends in a
//! clear `Unavailable` error instead of a hang.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::v1::master_client::MasterClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Metadata calls wait for an election (about a second) at most: polling more often than this
/// costs little, and waiting longer makes every failover look slower than it is.
const BACKOFF_MAX: Duration = Duration::from_millis(250);
const MAX_MESSAGE: usize = 64 << 20;

pub struct Masters {
    addrs: Vec<String>,
    tls: ClientTlsConfig,
    deadline: Duration,
    request_timeout: Duration,
    /// The master believed to lead, and a channel to it.
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    /// Index into `addrs` of the master to try next...
    next: usize,
    /// ...unless a leader hint named a master that is not in `addrs` (added to the group later).
    hinted: Option<String>,
    channel: Option<(String, Channel)>,
}

impl Masters {
    pub fn new(addrs: Vec<String>, tls: ClientTlsConfig, deadline: Duration) -> Result<Masters> {
        if addrs.is_empty() {
            return Err(Error::InvalidArgument("no master addresses (set --masters or CAIRN_MASTERS)".into()));
        }
        Ok(Masters { addrs, tls, deadline, request_timeout: Duration::from_secs(60), current: Mutex::default() })
    }

    async fn channel(&self) -> std::result::Result<(String, Channel), String> {
        let addr = {
            let g = self.current.lock().expect("masters lock");
            if let Some((a, ch)) = &g.channel {
                return Ok((a.clone(), ch.clone()));
            }
            g.hinted.clone().unwrap_or_else(|| self.addrs[g.next % self.addrs.len()].clone())
        };
        let ep = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| format!("bad master address {addr:?}: {e}"))?
            .tls_config(self.tls.clone())
            .map_err(|e| format!("TLS: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(self.request_timeout);
        let ch = ep
            .connect_with_connector(cairn_common::net::GrpcConnector)
            .await
            .map_err(|e| format!("connect to master {addr}: {}", error_chain(&e)))?;
        self.current.lock().expect("masters lock").channel = Some((addr.clone(), ch.clone()));
        Ok((addr, ch))
    }

    fn move_on(&self, hint: Option<String>) {
        let mut g = self.current.lock().expect("masters lock");
        g.channel = None;
        let was_hinted = g.hinted.take().is_some();
        match hint {
            Some(h) => match self.addrs.iter().position(|a| *a == h) {
                Some(i) => g.next = i,
                None => g.hinted = Some(h),
            },
            // After a hinted master failed, start over from the list where it was left.
            None if was_hinted => {}
            None => g.next += 1,
        }
    }

    /// Runs `f` against the leader, retrying on unavailability until the deadline.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(MasterClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut last_err;
        loop {
            let mut retry_now = false;
            // Each attempt (connect, TLS and HTTP/2 handshakes, the call) ends by the deadline:
            // a master that accepts connections but never answers must not hang the caller.
            let left = self.deadline.saturating_sub(start.elapsed()).max(Duration::from_millis(100));
            let attempt = tokio::time::timeout(left, async {
                let (_, ch) = self.channel().await.map_err(Attempt::Connect)?;
                let client =
                    MasterClient::new(ch).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
                f(client).await.map_err(Attempt::Status)
            })
            .await;
            match attempt {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                // Only "unavailable" is retried: the master did not take the request (not the
                // leader, no leader yet, overloaded), or the connection failed.
                Ok(Err(Attempt::Status(s))) if s.code() == tonic::Code::Unavailable => {
                    let hint =
                        s.metadata().get(cairn_proto::LEADER_HINT_KEY).and_then(|v| v.to_str().ok()).map(String::from);
                    last_err = s.message().to_string();
                    // A fresh hint is worth trying at once, once.
                    retry_now = hint.is_some() && backoff == BACKOFF_MIN;
                    self.move_on(hint);
                }
                // The connection broke while the call was in flight (the master died): whether
                // it took effect is unknown, and every mutation carries a request id, so a retry
                // is answered with the first result if there was one.
                Ok(Err(Attempt::Status(s))) if matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled) => {
                    last_err = s.message().to_string();
                    self.move_on(None);
                }
                Ok(Err(Attempt::Status(s))) => return Err(Error::from_status(&s)),
                Ok(Err(Attempt::Connect(e))) => {
                    last_err = e;
                    self.move_on(None);
                }
                Err(_) => {
                    last_err = "the master did not answer".into();
                    self.move_on(None);
                }
            }
            if start.elapsed() + backoff > self.deadline {
                return Err(Error::Unavailable(format!("no answer within {:?}: {last_err}", self.deadline)));
            }
            if retry_now {
                backoff *= 2;
                continue;
            }
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

enum Attempt {
    Connect(String),
    Status(tonic::Status),
}

/// A transport error's whole chain on one line ("transport error: connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
