//! The credentials pipe of a serving process (`--credentials-fd`): the first JSON document on
//! it is the identity the mount starts with — access keys, or a pod's web identity (a role and
//! a token, `{"web_identity": {…}}`) — and every later one replaces it while the mount serves.
//!
//! The CSI mounter keeps its end of the pipe open and writes one JSON line per rotation
//! (`s3vol_csi::handoff::Request::Credentials`); a user may just as well pipe one document and
//! close (`s3vol mount --credentials-fd 3 3<keys.json`). Documents are separated by newlines
//! and may span several lines themselves (pretty-printed JSON is read whole).
//!
//! Every document after the first is answered on the same descriptor when it is a socket (as
//! the mounter's is): `ok` once requests are signed with it, or `error: why` — so whoever sent
//! it knows when the old credentials may be revoked. (On a plain pipe the answer cannot be
//! written and is skipped.)
//!
//! After the first document a thread follows the pipe and swaps every new document into the
//! client's provider ([`RotatingCredentials`] for keys, [`WebIdentityCredentials`] for a token):
//! requests signed after the swap use the new identity, those signed before finish with the
//! old one. The kind never changes: keys sent to a mount that acts as a pod (or a token to
//! one that uses keys) are refused, never a fall-back to another identity. A document that
//! cannot be read is logged (without its content) and skipped — the identity in use stays —
//! and the end of the pipe (the mounter restarted) only means no more rotations.
//!
//! Every buffer that held credentials is zeroed: bytes are read straight from the descriptor
//! (no `BufReader`, whose buffer would not be) into zeroing storage, and what a parsed document
//! occupied is wiped before the rest is kept.

use std::os::fd::OwnedFd;

use anyhow::{Context, bail};
use s3vol_s3::{IdentityDocument, RotatingCredentials, WebIdentityCredentials};
use zeroize::{Zeroize, Zeroizing};

/// Reads documents from a credentials pipe.
pub(super) struct CredentialsPipe {
    fd: OwnedFd,
    /// Bytes read but not yet part of a returned document.
    pending: Zeroizing<Vec<u8>>,
    eof: bool,
}

impl std::fmt::Debug for CredentialsPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CredentialsPipe({} bytes pending)", self.pending.len())
    }
}

/// What one attempt to cut a document out of the pending bytes found.
enum Cut {
    Document(IdentityDocument),
    /// A complete document that is not credentials: skipped.
    Bad(serde_json::Error),
    NeedMore,
}

impl CredentialsPipe {
    pub(super) fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            pending: Zeroizing::new(Vec::new()),
            eof: false,
        }
    }

    /// Removes the first `n` pending bytes, zeroing them.
    fn consume(&mut self, n: usize) {
        let rest = Zeroizing::new(self.pending[n..].to_vec());
        // Dropping the old buffer zeroes its whole capacity.
        self.pending = rest;
    }

    /// Tries each newline in turn as the end of the next document.
    fn cut(&mut self) -> Cut {
        let lead = self
            .pending
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        if lead > 0 {
            self.consume(lead);
        }
        if self.pending.is_empty() {
            return Cut::NeedMore;
        }
        let mut from = 0;
        loop {
            let end = match self.pending[from..].iter().position(|&b| b == b'\n') {
                Some(i) => from + i + 1,
                None if self.eof => self.pending.len(),
                None => return Cut::NeedMore,
            };
            match serde_json::from_slice::<IdentityDocument>(&self.pending[..end]) {
                Ok(c) => {
                    self.consume(end);
                    return Cut::Document(c);
                }
                // Not complete yet: the document goes on past this newline.
                Err(e) if e.is_eof() && end < self.pending.len() => from = end,
                Err(e) if e.is_eof() && !self.eof => return Cut::NeedMore,
                Err(e) => {
                    self.consume(end);
                    return Cut::Bad(e);
                }
            }
        }
    }

    /// Answers the sender (see the module docs); a descriptor that cannot be written to (a
    /// pipe's read end) is no error.
    fn answer(&self, line: &str) {
        let _ = rustix::io::write(&self.fd, format!("{line}\n").as_bytes());
    }

    /// The next document; `Ok(None)` at the end of the pipe. A complete document that is not
    /// credentials is an error (its content is not repeated).
    pub(super) fn next(&mut self) -> anyhow::Result<Option<IdentityDocument>> {
        loop {
            match self.cut() {
                Cut::Document(c) => return Ok(Some(c)),
                Cut::Bad(e) => bail!(
                    "credentials are not JSON with access_key_id and secret_access_key, or a web_identity (line {}, column {}: {:?})",
                    e.line(),
                    e.column(),
                    e.classify()
                ),
                Cut::NeedMore if self.eof => return Ok(None),
                Cut::NeedMore => {}
            }
            let mut chunk = Zeroizing::new([0u8; 4096]);
            let n = loop {
                match rustix::io::read(&self.fd, &mut chunk[..]) {
                    Ok(n) => break n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e).context("reading the credentials pipe"),
                }
            };
            if n == 0 {
                self.eof = true;
            } else {
                if self.pending.len() + n > 1 << 20 {
                    self.pending.zeroize();
                    bail!("the credentials pipe sent more than 1 MiB without a complete document");
                }
                self.pending.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// The provider a pipe's documents go to.
#[derive(Debug)]
pub(super) enum Follower {
    Keys(RotatingCredentials),
    WebIdentity(WebIdentityCredentials),
}

impl Follower {
    /// Hands `doc` to the provider: `Ok(true)` when it changed the identity in use.
    /// `rt` runs the web identity provider's (async) replacement; this is never called on one
    /// of its workers.
    fn take(&self, doc: &IdentityDocument, rt: &tokio::runtime::Handle) -> anyhow::Result<bool> {
        match (self, doc) {
            (Follower::Keys(p), IdentityDocument::Keys(k)) => Ok(p.replace(k)),
            (Follower::WebIdentity(p), IdentityDocument::WebIdentity { web_identity }) => {
                Ok(rt.block_on(p.replace(web_identity.clone())))
            }
            (Follower::Keys(_), IdentityDocument::WebIdentity { .. }) => {
                bail!("a token was sent to a mount that uses access keys; refused")
            }
            (Follower::WebIdentity(_), IdentityDocument::Keys(_)) => {
                bail!("access keys were sent to a mount that acts as its pod; refused")
            }
        }
    }
}

/// Follows the pipe in a thread of its own, handing every new document to `follower`.
pub(super) fn follow(mut pipe: CredentialsPipe, follower: Follower, rt: tokio::runtime::Handle) {
    let spawned = std::thread::Builder::new()
        .name("s3vol-credentials".into())
        .spawn(move || {
            let mut updates = 0u64;
            loop {
                let outcome = match pipe.next() {
                    Ok(Some(mut doc)) => {
                        let taken = follower.take(&doc, &rt);
                        doc.wipe();
                        taken
                    }
                    Ok(None) => {
                        tracing::info!(
                            "the credentials pipe closed; the identity in use stays until the volume is mounted again"
                        );
                        return;
                    }
                    Err(e) => Err(e),
                };
                match &outcome {
                    Ok(_) => pipe.answer("ok"),
                    // The reason names no secret (see `next` and `Follower::take`).
                    Err(e) => pipe.answer(&format!("error: {e:#}").replace('\n', " ")),
                }
                match outcome {
                    Ok(true) => {
                        updates += 1;
                        metrics::counter!("s3vol_credential_updates_received_total").increment(1);
                        tracing::info!(
                            updates,
                            "new credentials received; requests signed from now on use them"
                        );
                    }
                    Ok(false) => tracing::debug!("credentials received, unchanged"),
                    Err(e) => {
                        metrics::counter!("s3vol_credential_update_errors_total").increment(1);
                        tracing::warn!(error = %format!("{e:#}"), "skipped a credentials update; the identity in use stays");
                        if pipe.eof {
                            return;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot follow the credentials pipe; the credentials cannot be rotated without a remount");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe_with(bytes: &[u8]) -> CredentialsPipe {
        let (r, w) = rustix::pipe::pipe().unwrap();
        std::fs::File::from(w).write_all(bytes).unwrap();
        CredentialsPipe::new(r)
    }

    fn id(c: Option<IdentityDocument>) -> String {
        match c.expect("a document") {
            IdentityDocument::Keys(k) => k.access_key_id,
            IdentityDocument::WebIdentity { web_identity } => web_identity.role_arn,
        }
    }

    #[test]
    fn reads_lines_pretty_documents_and_a_last_document_without_newline() {
        let mut p = pipe_with(
            b"{\"access_key_id\":\"A1\",\"secret_access_key\":\"s\"}\n\n{\n  \"access_key_id\": \"A2\",\n  \"secret_access_key\": \"s\"\n}\n{\"access_key_id\":\"A3\",\"secret_access_key\":\"s\",\"session_token\":\"t\"}",
        );
        assert_eq!(id(p.next().unwrap()), "A1");
        assert_eq!(id(p.next().unwrap()), "A2");
        assert_eq!(id(p.next().unwrap()), "A3");
        assert!(p.next().unwrap().is_none());
    }

    #[test]
    fn a_bad_document_is_an_error_that_does_not_repeat_it_and_reading_goes_on() {
        let mut p = pipe_with(
            b"{\"access_key_id\":\"A1\",\"secret\":\"LEAKME\"}\n{\"access_key_id\":\"A2\",\"secret_access_key\":\"s\"}\n",
        );
        let e = format!("{:#}", p.next().unwrap_err());
        assert!(!e.contains("LEAKME"), "{e}");
        assert_eq!(id(p.next().unwrap()), "A2");
        assert!(p.next().unwrap().is_none());
    }

    #[test]
    fn documents_arrive_while_the_pipe_stays_open() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut w = std::fs::File::from(w);
        let mut p = CredentialsPipe::new(r);
        w.write_all(b"{\"access_key_id\":\"A1\",").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            w.write_all(b"\"secret_access_key\":\"s\"}\n").unwrap();
            w.write_all(b"{\"access_key_id\":\"A2\",\"secret_access_key\":\"s\"}\n")
                .unwrap();
            w
        });
        assert_eq!(id(p.next().unwrap()), "A1");
        assert_eq!(id(p.next().unwrap()), "A2");
        drop(t.join().unwrap());
        assert!(p.next().unwrap().is_none());
    }

    #[test]
    fn web_identities_are_documents_and_never_replace_keys() {
        let mut p = pipe_with(
            b"{\"web_identity\":{\"role_arn\":\"R\",\"token\":\"T\",\"session_name\":\"s\"}}\n",
        );
        let doc = p.next().unwrap().unwrap();
        assert_eq!(id(Some(doc.clone())), "R");
        let keys = Follower::Keys(RotatingCredentials::new(&s3vol_s3::StaticCredentials {
            access_key_id: "A".into(),
            secret_access_key: "S".into(),
            session_token: None,
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = keys.take(&doc, rt.handle()).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[test]
    fn an_empty_pipe_has_no_document() {
        let mut p = pipe_with(b"");
        assert!(p.next().unwrap().is_none());
    }
}
