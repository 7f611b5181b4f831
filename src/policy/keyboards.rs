//! The keyboard state QEMU keeps per VM. Its VNC keyboard (which keys are down) and its
//! key queue belong to the VM, not to one client: a key held by one VNC session changes
//! what another session's key does, a disconnect releases every session's keys, and
//! all sessions' key events wait in one queue. The sessions of one run of a VM share
//! vizor's model of both.

use crate::libvirt::Console;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use vizor_keys::vnc::{Keyboard, Keymap, Pacer};

/// One run of a VM's keyboard, as QEMU keeps it.
#[derive(Debug)]
pub struct VmKeyboard {
    /// QEMU's VNC keyboard state.
    pub vnc: Keyboard,
    /// QEMU's key queue, as the relays fill it.
    pub pacer: Pacer,
}

/// One run of a VM: its UUID and libvirt's id of the run.
type Run = (String, Option<u32>);

/// The models of the VMs with live sessions.
#[derive(Default)]
pub struct VmKeyboards {
    by_vm: Mutex<HashMap<Run, Weak<Mutex<VmKeyboard>>>>,
}

impl VmKeyboards {
    /// The keyboard of the run of the VM `console` names (its UUID and libvirt's id of
    /// the run): shared while any session holds it, new when none does (QEMU released
    /// every key when the last client left).
    pub fn of(&self, console: &Console) -> Arc<Mutex<VmKeyboard>> {
        let id = (console.uuid.clone(), console.instance);
        let mut map = self.by_vm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(&id).and_then(Weak::upgrade) {
            return k;
        }
        map.retain(|_, k| k.strong_count() > 0);
        let k = Arc::new(Mutex::new(VmKeyboard {
            vnc: Keyboard::new(Keymap::from_libvirt(console.keymap.as_deref())),
            pacer: Pacer::default(),
        }));
        map.insert(id, Arc::downgrade(&k));
        k
    }
}
