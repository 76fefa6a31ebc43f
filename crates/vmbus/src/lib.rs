//! VMBus for Viridian: the channel-management server as a sans-I/O state machine
//! ([`server`]), ring buffers over guest memory ([`ring`]), packet parsing ([`packet`]), the
//! channel API devices use ([`channel`]), the device trait ([`device`]), the run-time host
//! with its control thread and one worker thread per open channel ([`host`]), and (with the
//! `test-util` feature) a guest-side client that plays the Linux driver's role in loopback
//! tests ([`client`], [`loopback`]).
#![forbid(unsafe_code)]

pub mod channel;
#[cfg(feature = "test-util")]
pub mod client;
pub mod device;
pub mod host;
#[cfg(feature = "test-util")]
pub mod loopback;
pub mod packet;
pub mod ring;
pub mod server;
#[cfg(feature = "test-util")]
pub mod testing;

pub use channel::{Channel, ChannelError, OwnedPacket, Side, SignalFn};
pub use device::{
    BusControl, ChannelWorker, Device, DeviceOffer, DeviceRestoreError, Gpadls, OpenError,
    OpenedChannel, Progress, SavedDevice, WorkerError,
};
pub use host::{HostConfig, HostError, PostFailure, Synic, VmbusHost};
pub use packet::{Packet, PagedRange};
pub use server::{
    Action, OfferParams, OpenRequest, PostError, ProtocolError, Server, ServerConfig,
};
