//! The node side of the rules: the set of enrolled pod IPs that kubelet probes are SNATed for, kept in step
//! with enrolment.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tracing::warn;

use super::Backend;
use super::apply::ApplyError;

/// The probe set, as the agent keeps it: which pod owns which IP (a removal only takes out an IP its own pod
/// added, so a reused IP is never dropped by its previous owner's late removal).
#[derive(Debug)]
pub struct ProbeSet {
    backend: Backend,
    owners: Mutex<BTreeMap<IpAddr, String>>,
}

impl ProbeSet {
    /// Installs the node's rules with `members` (uid → IPs) and returns the set. Run in the node's netns.
    pub fn install(backend: Backend, members: &[(String, Vec<IpAddr>)]) -> Result<ProbeSet, ApplyError> {
        let mut owners = BTreeMap::new();
        for (uid, ips) in members {
            for ip in ips {
                owners.insert(*ip, uid.clone());
            }
        }
        let ips: Vec<IpAddr> = owners.keys().copied().collect();
        backend.install_host(&ips)?;
        Ok(ProbeSet { backend, owners: Mutex::new(owners) })
    }

    /// Adds a pod's IPs.
    pub fn add(&self, uid: &str, ips: &[IpAddr]) {
        let mut owners = self.owners.lock().unwrap();
        for ip in ips {
            owners.insert(*ip, uid.to_string());
            if let Err(e) = self.backend.host_member(*ip, true) {
                warn!(%ip, error = %e, "cannot add the pod to the node's probe set; its kubelet probes will be captured");
            }
        }
    }

    /// Removes a pod's IPs, those it still owns.
    pub fn remove(&self, uid: &str, ips: &[IpAddr]) {
        let mut owners = self.owners.lock().unwrap();
        for ip in ips {
            if owners.get(ip).map(String::as_str) == Some(uid) {
                owners.remove(ip);
                if let Err(e) = self.backend.host_member(*ip, false) {
                    warn!(%ip, error = %e, "cannot remove the pod from the node's probe set");
                }
            }
        }
    }

    /// The IPs in the set.
    pub fn members(&self) -> Vec<IpAddr> {
        self.owners.lock().unwrap().keys().copied().collect()
    }
}
