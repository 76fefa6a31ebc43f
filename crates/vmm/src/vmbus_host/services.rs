//! Which integration services the VM offers (Get-, Enable- and Disable-VMIntegrationService).
//! A disabled service's channel is rescinded; enabling it offers the channel again and the
//! guest's hv_utils binds it as a new device.

use super::Vmbus;
use crate::integration::IcBusDevice;
use crate::kvp::KvpBusDevice;
use ic::HeartbeatState;
use std::sync::Arc;
use vmbus::Device;

/// An integration service, by Hyper-V's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Heartbeat,
    KeyValuePairExchange,
    Shutdown,
    TimeSynchronization,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Heartbeat,
        Service::KeyValuePairExchange,
        Service::Shutdown,
        Service::TimeSynchronization,
    ];

    /// Hyper-V's display name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Heartbeat => "Heartbeat",
            Service::KeyValuePairExchange => "Key-Value Pair Exchange",
            Service::Shutdown => "Shutdown",
            Service::TimeSynchronization => "Time Synchronization",
        }
    }

    /// A short name for command lines.
    pub fn short(self) -> &'static str {
        match self {
            Service::Heartbeat => "heartbeat",
            Service::KeyValuePairExchange => "kvp",
            Service::Shutdown => "shutdown",
            Service::TimeSynchronization => "timesync",
        }
    }

    /// Parses a short or display name, in any case.
    pub fn parse(s: &str) -> Option<Service> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|v| v.short().eq_ignore_ascii_case(s) || v.name().eq_ignore_ascii_case(s))
    }
}

/// One service as Get-VMIntegrationService shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceState {
    pub name: &'static str,
    pub enabled: bool,
    /// `OK`, `No Contact` (the guest has not connected it), `Lost Communication` (heartbeat
    /// answers stopped), or empty when disabled.
    pub status: &'static str,
}

impl Vmbus {
    fn service_device(&self, s: Service) -> Arc<dyn Device> {
        match s {
            Service::Heartbeat => Arc::new(IcBusDevice(self.heartbeat.clone())),
            Service::Shutdown => Arc::new(IcBusDevice(self.shutdown.clone())),
            Service::TimeSynchronization => Arc::new(IcBusDevice(self.timesync.clone())),
            Service::KeyValuePairExchange => Arc::new(KvpBusDevice(self.kvp.clone())),
        }
    }

    /// Offers (or rescinds) a service's channel. Doing what is already so is no error.
    pub fn set_service(&self, s: Service, enabled: bool) -> Result<(), String> {
        let mut offered = support::lock(&self.services);
        match (enabled, offered.get(&s).copied()) {
            (true, None) => {
                let id = self
                    .host
                    .add_device(self.service_device(s))
                    .map_err(|e| format!("cannot offer {}: {e}", s.name()))?;
                offered.insert(s, id);
            }
            (false, Some(id)) => {
                self.host
                    .remove_device(id)
                    .map_err(|e| format!("cannot rescind {}: {e}", s.name()))?;
                offered.remove(&s);
            }
            _ => {}
        }
        Ok(())
    }

    /// Every service with whether it is offered and how the guest's side is doing.
    pub fn services(&self) -> Vec<ServiceState> {
        let offered = support::lock(&self.services);
        Service::ALL
            .into_iter()
            .map(|s| {
                let enabled = offered.contains_key(&s);
                let status = if !enabled {
                    ""
                } else {
                    let connected = match s {
                        Service::Heartbeat => {
                            return ServiceState {
                                name: s.name(),
                                enabled,
                                status: match self.heartbeat.snapshot().heartbeat {
                                    HeartbeatState::Healthy => "OK",
                                    HeartbeatState::Lost => "Lost Communication",
                                    HeartbeatState::NoContact => "No Contact",
                                },
                            }
                        }
                        Service::Shutdown => self.shutdown.snapshot().ready,
                        Service::TimeSynchronization => self.timesync.snapshot().ready,
                        Service::KeyValuePairExchange => self.kvp.ready(),
                    };
                    if connected {
                        "OK"
                    } else {
                        "No Contact"
                    }
                };
                ServiceState {
                    name: s.name(),
                    enabled,
                    status,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_both_ways() {
        for s in Service::ALL {
            assert_eq!(Service::parse(s.short()), Some(s));
            assert_eq!(Service::parse(&s.name().to_uppercase()), Some(s));
        }
        assert_eq!(Service::parse("vss"), None);
    }
}
