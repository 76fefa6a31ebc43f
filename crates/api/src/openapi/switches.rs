//! Operations on virtual switches.

use crate::*;

/// The switches defined on this host, with their kernel state and the VMs using them
/// (Get-VMSwitch).
#[utoipa::path(get, path = "/switches", tag = "switches",
    responses((status = 200, body = [Switch]), (status = 403, body = ErrorBody)))]
pub fn list_switches() {}

/// Create a switch (New-VMSwitch): its bridge, and its definition under the state directory.
/// Nothing is left behind when it fails.
#[utoipa::path(post, path = "/switches", tag = "switches", request_body = NewSwitch,
    responses(
        (status = 201, body = Switch),
        (status = 400, body = ErrorBody, description = "Malformed JSON"),
        (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The name is taken, its bridge's name is another interface's, or the adapter is in use"),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "A field is invalid (name, type, adapter, host_address); the message names it")))]
pub fn create_switch() {}

/// One switch (Get-VMSwitch NAME).
#[utoipa::path(get, path = "/switches/{name}", tag = "switches", params(("name" = String, Path)),
    responses((status = 200, body = Switch), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub fn get_switch() {}

/// Delete a switch (Remove-VMSwitch); an External adapter gets its addresses and routes back.
#[utoipa::path(delete, path = "/switches/{name}", tag = "switches",
    params(("name" = String, Path), SwitchRemoveParams),
    responses((status = 204, description = "Removed"), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "VMs' adapters use it (unless forced)")))]
pub fn remove_switch() {}
