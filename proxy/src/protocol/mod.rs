//! The Postgres wire protocol as pgtenant needs it: framing raw messages without decoding them
//! (the hot path forwards bytes untouched), reading the few fields the session state machine looks
//! at, and building the messages pgtenant itself sends (with pgwire's encoders).

pub mod build;
pub mod frame;
pub mod options;
pub mod peek;
pub mod tags;
