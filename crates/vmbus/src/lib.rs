//! VMBus for Viridian: the channel-management server as a sans-I/O state machine
//! ([`server`]), ring buffers over guest memory ([`ring`]), packet parsing ([`packet`]), the
//! channel API devices use ([`channel`]), and a guest-side client that plays the Linux
//! driver's role in loopback tests ([`client`], [`loopback`]).
#![forbid(unsafe_code)]

pub mod channel;
pub mod client;
pub mod loopback;
pub mod packet;
pub mod ring;
pub mod server;

pub use channel::{Channel, ChannelError, OwnedPacket, Side, SignalFn};
pub use packet::{Packet, PagedRange};
pub use server::{
    Action, OfferParams, OpenRequest, PostError, ProtocolError, Server, ServerConfig,
};
