//! The viridiand REST API: the JSON types both sides speak, the error envelope, input checks
//! that need no host knowledge, the OpenAPI document generated from these types, and a small
//! blocking HTTP/1.1 client over the service's Unix socket (used by the CLI and the tests).
#![forbid(unsafe_code)]

pub mod client;
mod devices;
mod error;
mod jobs;
pub mod openapi;
mod switches;
mod types;
mod validate;

pub use devices::*;
pub use error::{ErrorBody, ErrorDetail};
pub use jobs::{Job, JobState};
pub use switches::*;
pub use types::*;
pub use validate::{format_size, parse_size, validate_name, MAX_NAME_LEN, MIN_MEMORY};
