//! The client side of the proxy: what happens between accepting a socket and handing a
//! authenticated client to its session — TLS negotiation and the startup packet (`startup`),
//! then the JWT-as-password exchange (`auth`, checked against `rules`) and the login greeting
//! (`greeting`).

pub mod auth;
pub mod bypass;
pub mod greeting;
pub mod params;
pub mod rules;
pub mod startup;
pub mod tls;
