//! The fixed-newstyle handshake: greet, read the client's flags, answer its
//! options one at a time until it picks an export (`GO` or `EXPORT_NAME`),
//! aborts, or breaks the rules badly enough that the connection must close.
//!
//! Every option is read whole (its length is capped by the codec before any
//! byte of data is read) and parsed strictly inside that length; every option
//! gets a reply; an unknown option is skipped and refused with `ERR_UNSUP`.

use std::io::Write;
use std::sync::Arc;

use thiserror::Error;

use super::codec::option_reply as out;
use super::codec::{
    ClientOption, InfoRequest, MetaContextRequest, OPTION_HEADER_LEN, OptionHeader,
    OptionHeaderError, client_flag as cflag, decode_client_flags, handshake_flag as hflag, info,
    parse_option, rep,
};
use super::export::{Contexts, Export, Exports, MAX_PAYLOAD, MIN_BLOCK, PREFERRED_BLOCK};
use super::stream::{Input, ReadError};
use super::tls::{Tls, TlsMode};

/// How replies are framed on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Simple replies only.
    Simple,
    /// Structured replies (`STRUCTURED_REPLY`).
    Structured,
    /// Extended headers (`EXTENDED_HEADERS`): 32-byte requests, extended chunks.
    Extended,
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub struct Session {
    pub export: Arc<Export>,
    pub style: Style,
    pub contexts: Contexts,
    /// The connection went over to TLS.
    pub tls: bool,
}

/// Why the handshake ended without an export.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("the client aborted the handshake")]
    Aborted,
    #[error("reading the handshake: {0}")]
    Read(String),
    #[error("writing the handshake: {0}")]
    Write(#[source] std::io::Error),
    #[error("the client's flags {0:#x} carry bits that were not offered")]
    UnknownClientFlags(u32),
    #[error(transparent)]
    Header(#[from] OptionHeaderError),
    #[error("EXPORT_NAME asked for {0:?}, which is not exported")]
    UnknownExport(String),
    #[error("EXPORT_NAME: {0}")]
    BadExportName(String),
    #[error("EXPORT_NAME before STARTTLS, and this server requires TLS")]
    TlsRequired,
    #[error("starting TLS: {0}")]
    Tls(#[source] std::io::Error),
}

impl From<ReadError> for HandshakeError {
    fn from(e: ReadError) -> HandshakeError {
        HandshakeError::Read(e.to_string())
    }
}

/// The handshake flags we offer.
const OFFERED: u16 = hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES;

struct Negotiation<'a> {
    input: &'a mut Input,
    exports: &'a Exports,
    /// TLS, when the server offers it (`input` says whether this connection
    /// is on it).
    tls: Option<&'a Tls>,
    /// Names the connection in the TLS bridge's log lines.
    label: &'a str,
    style: Style,
    no_zeroes: bool,
    /// Contexts chosen by `SET_META_CONTEXT`, and for which export.
    contexts: Contexts,
    contexts_for: Option<String>,
    out: Vec<u8>,
}

/// Runs the handshake on `input`. With `tls`, `STARTTLS` upgrades the
/// connection (`input` then reads the plaintext), and with
/// [`TlsMode::Require`] nothing else is answered before it. `label` names the
/// connection in log lines.
pub fn negotiate(
    input: &mut Input,
    exports: &Exports,
    tls: Option<&Tls>,
    label: &str,
) -> Result<Session, HandshakeError> {
    let mut n = Negotiation {
        input,
        exports,
        tls,
        label,
        style: Style::Simple,
        no_zeroes: false,
        contexts: Contexts::default(),
        contexts_for: None,
        out: Vec::with_capacity(4096),
    };
    out::put_greeting(&mut n.out, OFFERED);
    n.send()?;
    let mut flags = [0u8; 4];
    n.input.read_exact(&mut flags)?;
    let flags = decode_client_flags(&flags).unwrap_or(0);
    if flags & !u32::from(OFFERED) != 0 {
        return Err(HandshakeError::UnknownClientFlags(flags));
    }
    n.no_zeroes = flags & cflag::NO_ZEROES != 0;
    let mut data = Vec::new();
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        n.input.read_exact(&mut head)?;
        let head = OptionHeader::decode(&head)?;
        // The codec capped `length` at MAX_OPTION_LEN (64 KiB).
        data.resize(head.length as usize, 0);
        n.input.read_exact(&mut data)?;
        if let Some(session) = n.option(head.option, &data)? {
            return Ok(session);
        }
    }
}

impl Negotiation<'_> {
    fn send(&mut self) -> Result<(), HandshakeError> {
        let res = self.input.stream().write_all(&self.out);
        self.out.clear();
        res.map_err(HandshakeError::Write)
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) -> Result<(), HandshakeError> {
        out::put_error(&mut self.out, option, reply_type, message);
        self.send()
    }

    /// Answers one option; `Some` when the client has chosen its export.
    fn option(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, HandshakeError> {
        use super::codec::opt;
        let required = self.tls.is_some_and(|t| t.mode() == TlsMode::Require);
        if required && !self.input.is_tls() && option != opt::STARTTLS && option != opt::ABORT {
            // EXPORT_NAME has no error reply: the session ends.
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            self.error(
                option,
                rep::ERR_TLS_REQD,
                "TLS is required: send STARTTLS first",
            )?;
            return Ok(None);
        }
        if option == opt::SET_META_CONTEXT {
            // It replaces the contexts chosen before, even when it fails.
            self.contexts = Contexts::default();
            self.contexts_for = None;
        }
        let parsed = match parse_option(option, data) {
            Ok(parsed) => parsed,
            Err(e) if option == super::codec::opt::EXPORT_NAME => {
                return Err(HandshakeError::BadExportName(e.to_string()));
            }
            Err(e) => {
                self.error(option, e.reply_type(), &e.to_string())?;
                return Ok(None);
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                let Some(export) = self.exports.find(name).cloned() else {
                    return Err(HandshakeError::UnknownExport(name.to_string()));
                };
                let flags = export.flags(self.style != Style::Simple);
                out::put_export_name_reply(&mut self.out, export.size(), flags, self.no_zeroes);
                self.send()?;
                return Ok(Some(self.session(export)));
            }
            ClientOption::Abort => {
                out::put_ack(&mut self.out, option);
                // The client may already be gone; it asked to end anyway.
                let _ = self.send();
                return Err(HandshakeError::Aborted);
            }
            ClientOption::List => {
                for export in self.exports.clone().iter() {
                    if out::put_server(&mut self.out, option, &export.name).is_err() {
                        tracing::warn!(name = %export.name, "export name cannot be listed");
                    }
                }
                out::put_ack(&mut self.out, option);
                self.send()?;
            }
            ClientOption::StartTls => match self.tls {
                None => {
                    self.error(
                        option,
                        rep::ERR_POLICY,
                        "TLS is not configured on this server",
                    )?;
                }
                Some(_) if self.input.is_tls() => {
                    self.error(option, rep::ERR_INVALID, "TLS is already on")?;
                }
                Some(tls) => {
                    out::put_ack(&mut self.out, option);
                    self.send()?;
                    tls.upgrade(self.input, self.label.to_string())
                        .map_err(HandshakeError::Tls)?;
                    // Nothing negotiated in the clear carries over.
                    self.style = Style::Simple;
                    self.contexts = Contexts::default();
                    self.contexts_for = None;
                }
            },
            ClientOption::Info(req) => {
                self.info(option, req)?;
            }
            ClientOption::Go(req) => {
                if let Some(export) = self.info(option, req)? {
                    return Ok(Some(self.session(export)));
                }
            }
            ClientOption::StructuredReply => match self.style {
                Style::Simple => {
                    self.style = Style::Structured;
                    out::put_ack(&mut self.out, option);
                    self.send()?;
                }
                Style::Structured => {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "structured replies are already on",
                    )?;
                }
                // The extension's answer: no going back from extended headers.
                Style::Extended => {
                    self.error(
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are on; they stay on",
                    )?;
                }
            },
            ClientOption::ExtendedHeaders => {
                if self.style == Style::Extended {
                    self.error(option, rep::ERR_INVALID, "extended headers are already on")?;
                } else {
                    self.style = Style::Extended;
                    out::put_ack(&mut self.out, option);
                    self.send()?;
                }
            }
            ClientOption::ListMetaContext(req) => self.meta(option, req, false)?,
            ClientOption::SetMetaContext(req) => self.meta(option, req, true)?,
            ClientOption::Unknown(_) => {
                let msg = format!("option {option} is not supported");
                self.error(option, rep::ERR_UNSUP, &msg)?;
            }
        }
        Ok(None)
    }

    /// The session for `export`, keeping the contexts chosen for it.
    fn session(&self, export: Arc<Export>) -> Session {
        let same = self
            .contexts_for
            .as_deref()
            .and_then(|name| self.exports.find(name))
            .is_some_and(|e| Arc::ptr_eq(e, &export));
        Session {
            export,
            style: self.style,
            contexts: if same {
                self.contexts
            } else {
                Contexts::default()
            },
            tls: self.input.is_tls(),
        }
    }

    /// Answers `INFO` or `GO`; returns the export when it exists.
    fn info(
        &mut self,
        option: u32,
        req: InfoRequest<'_>,
    ) -> Result<Option<Arc<Export>>, HandshakeError> {
        let Some(export) = self.exports.find(req.name).cloned() else {
            let msg = format!("no export named {:?}", req.name);
            self.error(option, rep::ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        let flags = export.flags(self.style != Style::Simple);
        out::put_info_export(&mut self.out, option, export.size(), flags);
        if req.requests.contains(info::NAME) {
            // Names came from the command line and were checked there.
            let _ = out::put_info_name(&mut self.out, option, &export.name);
        }
        if req.requests.contains(info::DESCRIPTION) {
            out::put_info_description(&mut self.out, option, &export.description);
        }
        out::put_info_block_size(
            &mut self.out,
            option,
            MIN_BLOCK,
            PREFERRED_BLOCK,
            MAX_PAYLOAD,
        );
        out::put_ack(&mut self.out, option);
        self.send()?;
        Ok(Some(export))
    }

    /// Answers `LIST_META_CONTEXT` (`set` false) or `SET_META_CONTEXT`
    /// (the caller has cleared the contexts chosen before).
    fn meta(
        &mut self,
        option: u32,
        req: MetaContextRequest<'_>,
        set: bool,
    ) -> Result<(), HandshakeError> {
        if self.style == Style::Simple {
            let msg = "metadata contexts need structured replies first";
            return self.error(option, rep::ERR_INVALID, msg);
        }
        if self.exports.find(req.name).is_none() {
            let msg = format!("no export named {:?}", req.name);
            return self.error(option, rep::ERR_UNKNOWN, &msg);
        }
        let chosen = if req.queries.is_empty() && !set {
            Contexts {
                allocation: true,
                depth: true,
            }
        } else {
            req.queries
                .iter()
                .map(|q| Contexts::matching(q, !set))
                .fold(Contexts::default(), Contexts::union)
        };
        for (id, name) in chosen.list() {
            // proto.md: LIST's context ids are reserved, and should be 0.
            let id = if set { id } else { 0 };
            // Our own context names are valid NBD strings.
            let _ = out::put_meta_context(&mut self.out, option, id, name);
        }
        out::put_ack(&mut self.out, option);
        if set {
            self.contexts = chosen;
            self.contexts_for = Some(req.name.to_string());
        }
        self.send()
    }
}
