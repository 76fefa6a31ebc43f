//! Disk images: VHDX (MS-VHDX), legacy VHD, and raw files, behind one [`Disk`] trait.
//!
//! File input is hostile: every structure read from a file is validated, and a malformed value
//! becomes an [`Error`] naming the file, the structure and the offset; never a panic or a huge
//! allocation.
#![forbid(unsafe_code)]

mod direct;
mod disk;
mod lock;
pub mod open;
pub mod raw;
pub mod vhd;
pub mod vhdx;

pub use direct::{Direct, DirectFd};
pub use disk::{Disk, Error, Extent, IoBuffer, Result};
pub use lock::lock_file;
