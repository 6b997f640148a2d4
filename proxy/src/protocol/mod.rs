//! The Postgres wire protocol as pgtenant needs it: framing raw messages without decoding them
//! (the hot path forwards bytes untouched), reading the few fields the session state machine looks
//! at, and building the messages pgtenant itself sends (with pgwire's encoders).

pub mod build;
pub mod frame;
pub mod options;
pub mod peek;
pub mod tags;

/// The startup parameter (and setting) that names the client application. pgtenant treats it
/// apart from the others: each pooled connection logs in with the name of the client it was opened
/// for, so whether a transaction must set it depends on the connection it runs on.
pub const APPLICATION_NAME: &str = "application_name";
