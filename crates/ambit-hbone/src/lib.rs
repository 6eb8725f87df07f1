//! HBONE: the tunnel every byte of the mesh travels in.
//!
//! A TCP connection to the destination's port 15008, TLS 1.3 with both sides presenting
//! workload certificates ([`ambit_tls::spiffe`]), HTTP/2, and one `CONNECT` stream per
//! tunnelled TCP connection, its `:authority` naming the original destination.
//!
//! - [`server`]: accepts connections, checks each CONNECT, hands it to a
//!   [`server::ConnectHandler`] that accepts (200, a byte stream) or refuses (a status).
//! - [`client`]: a pool of HTTP/2 connections keyed by source identity, expected
//!   destination identities, destination and socket options; [`client::Pool::connect`]
//!   opens a stream.
//! - [`stream`]: the byte stream of one CONNECT and the copy loop between it and a socket.
//! - [`tls_io`]: TLS that sends pending records when HTTP/2 flushes, not on every write.
//! - [`headers`]: `forwarded`, `baggage`, `traceparent`.
//! - [`socket`]: socket options the node proxy needs (source address, SO_MARK, network
//!   namespace).
//! - [`workers`]: the data path's threads, one single-threaded runtime each, and the
//!   hand-over of accepted connections between them.
//!
//! The crate knows nothing about workloads or policy: callers supply identities,
//! certificates and addresses.

pub mod admission;
pub mod client;
pub mod headers;
pub mod read_buffer;
pub mod server;
pub mod socket;
pub mod stream;
pub mod tls_io;
pub mod workers;

use std::time::Duration;

pub use client::{ConnectError, ConnectRequest, Pool, PoolConfig};
pub use headers::ConnectHeaders;
pub use server::{ConnectHandler, IncomingConnect, Server, ServerConfig};
pub use stream::H2Stream;
pub use workers::Workers;

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// Receive buffer under TLS on an HBONE connection. rustls asks the socket for about
/// 4 KiB at a time, which would cost one system call per 4 KiB of ciphertext; this
/// buffer turns that into one call per up to 64 KiB (one allocation per connection, on
/// the server only once the client is authenticated: [`read_buffer`]).
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// HTTP/2 settings shared by both ends.
///
/// The defaults follow Istio's choices (4 MiB stream window, 16 MiB connection window,
/// 1 MiB frames), which the benchmark in `benches/tunnel.rs` confirms: smaller windows cap
/// one stream's throughput at window / round-trip time, larger ones only add memory.
#[derive(Debug, Clone)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Data a stream may have queued for sending beyond the window (bounds memory per
    /// stream).
    pub max_send_buffer: usize,
    /// Largest request header block accepted.
    pub max_header_list_size: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_send_buffer: 1 << 20,
            max_header_list_size: 16 << 10,
        }
    }
}

/// Keep-alive: a PING every `interval`; no answer within `timeout` means the peer is gone.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}
