//! Hypercall dispatch.
//!
//! Validation order and statuses:
//!
//! 1. Unknown call code: `INVALID_HYPERCALL_CODE`, whatever the other control bits hold.
//! 2. Reserved control bits (27..31, 44..47, 60..63; bit 31 "nested" included, since we are
//!    not a nested hypervisor): `INVALID_HYPERCALL_INPUT`.
//! 3. Control shape: a simple call with a rep count or rep start, a rep call with rep count 0
//!    or rep start >= rep count, a variable header on a call that has none, or the fast bit on
//!    a call whose input does not fit in RDX:R8 (or that has output): `INVALID_HYPERCALL_INPUT`.
//! 4. Slow calls: input/output GPA not 8-byte aligned: `INVALID_ALIGNMENT`; a block that
//!    crosses a page boundary or is not guest RAM: `INVALID_HYPERCALL_INPUT`.
//! 5. Call-specific checks (reserved fields, payload size, message type, flag number):
//!    `INVALID_PARAMETER` (or `INVALID_PARTITION_ID`/`INVALID_VP_INDEX` for GetVpRegisters).
//! 6. HvPostMessage/HvSignalEvent from a VP whose SynIC is disabled: `ACCESS_DENIED`.
//!
//! Calls that reach a connection return an action; the caller (VMBus) decides the final status
//! (`SUCCESS`, `INVALID_CONNECTION_ID`, `INSUFFICIENT_BUFFERS`, ...) and builds RAX with
//! [`HypercallOutcome::rax_with`].

use hvdef::hv::{
    self, call, hypercall_result, HvGetVpRegistersInput, HvPostMessageInput, HvRegisterValue,
    HvSignalEventInput, HvStatus, HypercallControl, HV_PAGE_SIZE,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::{MessagePayload, Partition};

/// The registers a hypercall reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HypercallRegs {
    /// Control word.
    pub rcx: u64,
    /// Input GPA (slow) or first fast input.
    pub rdx: u64,
    /// Output GPA (slow) or second fast input.
    pub r8: u64,
}

/// HvPostMessage from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostMessageRequest {
    /// The calling VP.
    pub vp: u32,
    /// Connection ID (24 bits).
    pub connection_id: u32,
    /// Message type (1..=0x7FFFFFFF).
    pub message_type: u32,
    pub payload: MessagePayload,
}

/// HvSignalEvent from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalEventRequest {
    /// The calling VP.
    pub vp: u32,
    /// Connection ID (24 bits).
    pub connection_id: u32,
    /// Flag number (< 2048).
    pub flag_number: u16,
}

/// A hypercall that the caller must complete.
// The message payload is carried inline on purpose: no allocation per hypercall.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypercallAction {
    PostMessage(PostMessageRequest),
    SignalEvent(SignalEventRequest),
}

/// Result of [`Partition::hypercall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallOutcome {
    /// Status when there is no action; `SUCCESS` provisionally when there is one.
    pub status: HvStatus,
    /// Reps completed (rep calls only).
    pub reps_completed: u16,
    /// A request for the caller (VMBus) to handle.
    pub action: Option<HypercallAction>,
}

impl HypercallOutcome {
    fn status(status: HvStatus) -> Self {
        Self {
            status,
            reps_completed: 0,
            action: None,
        }
    }

    fn action(action: HypercallAction) -> Self {
        Self {
            status: HvStatus::SUCCESS,
            reps_completed: 0,
            action: Some(action),
        }
    }

    /// The value for RAX.
    pub fn rax(&self) -> u64 {
        hypercall_result(self.status, self.reps_completed)
    }

    /// The value for RAX once the caller has handled the action with `status`.
    pub fn rax_with(&self, status: HvStatus) -> u64 {
        hypercall_result(status, self.reps_completed)
    }
}

type Result<T> = std::result::Result<T, HvStatus>;

/// Checks a slow-call input or output block: alignment, page crossing, guest RAM.
fn check_block(p: &Partition, gpa: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if !gpa.is_multiple_of(8) {
        return Err(HvStatus::INVALID_ALIGNMENT);
    }
    if gpa % HV_PAGE_SIZE + len > HV_PAGE_SIZE || !p.mem.contains(gpa, len) {
        return Err(HvStatus::INVALID_HYPERCALL_INPUT);
    }
    Ok(())
}

fn read_input<T: FromBytes + IntoBytes>(p: &Partition, gpa: u64) -> Result<T> {
    check_block(p, gpa, size_of::<T>() as u64)?;
    p.mem
        .read_obj(gpa)
        .map_err(|_| HvStatus::INVALID_HYPERCALL_INPUT)
}

fn simple_shape(c: HypercallControl) -> Result<()> {
    if c.rep_count() != 0 || c.rep_start() != 0 || c.variable_header_size() != 0 {
        return Err(HvStatus::INVALID_HYPERCALL_INPUT);
    }
    Ok(())
}

impl Partition {
    /// Dispatches a hypercall made by VP `vp` through the hypercall page (the `OUT` to
    /// [`crate::HYPERCALL_PORT`]).
    ///
    /// Returns `None` when the hypercall page is disabled: the `OUT` was then not a hypercall
    /// and the caller leaves RAX alone (Hyper-V raises #UD here; ignoring it is the gentle
    /// equivalent). The caller should also ignore calls from CPL > 0 (Hyper-V raises #UD).
    /// Otherwise write [`HypercallOutcome::rax`] (or, after handling the action,
    /// [`HypercallOutcome::rax_with`]) to RAX.
    pub fn hypercall(&self, vp: u32, regs: HypercallRegs) -> Option<HypercallOutcome> {
        if !self.hypercalls_enabled() || vp >= self.config.vp_count {
            return None;
        }
        let control = HypercallControl(regs.rcx);
        let code = control.code();
        let known = matches!(
            code,
            call::POST_MESSAGE | call::SIGNAL_EVENT | call::GET_VP_REGISTERS
        );
        if !known {
            if self.log_limit.allow() {
                tracing::info!(vp, code = format_args!("{code:#x}"), "unknown hypercall");
            }
            return Some(HypercallOutcome::status(HvStatus::INVALID_HYPERCALL_CODE));
        }
        if control.reserved_bits() != 0 {
            return Some(HypercallOutcome::status(HvStatus::INVALID_HYPERCALL_INPUT));
        }
        let outcome = match code {
            call::POST_MESSAGE => self.post_message_call(vp, control, regs),
            call::SIGNAL_EVENT => self.signal_event_call(vp, control, regs),
            _ => return Some(self.get_vp_registers_call(vp, control, regs)),
        };
        Some(outcome.unwrap_or_else(HypercallOutcome::status))
    }

    fn post_message_call(
        &self,
        vp: u32,
        control: HypercallControl,
        regs: HypercallRegs,
    ) -> Result<HypercallOutcome> {
        simple_shape(control)?;
        if control.fast() {
            // 256 bytes of input do not fit in RDX:R8, and XMM input is not offered.
            return Err(HvStatus::INVALID_HYPERCALL_INPUT);
        }
        let input: HvPostMessageInput = read_input(self, regs.rdx)?;
        if input.connection_id & !hv::HV_CONNECTION_ID_MASK != 0
            || input.reserved != 0
            || input.message_type == 0
            || input.message_type > hv::HV_MESSAGE_TYPE_MAX_GUEST
            || input.payload_size as usize > hv::HV_MESSAGE_PAYLOAD_SIZE
        {
            return Err(HvStatus::INVALID_PARAMETER);
        }
        if !self.synic_enabled(vp) {
            return Err(HvStatus::ACCESS_DENIED);
        }
        let payload = MessagePayload::new(&input.payload[..input.payload_size as usize])
            .ok_or(HvStatus::INVALID_PARAMETER)?;
        Ok(HypercallOutcome::action(HypercallAction::PostMessage(
            PostMessageRequest {
                vp,
                connection_id: input.connection_id,
                message_type: input.message_type,
                payload,
            },
        )))
    }

    fn signal_event_call(
        &self,
        vp: u32,
        control: HypercallControl,
        regs: HypercallRegs,
    ) -> Result<HypercallOutcome> {
        simple_shape(control)?;
        let input: HvSignalEventInput = if control.fast() {
            HvSignalEventInput::read_from_bytes(&regs.rdx.to_le_bytes())
                .map_err(|_| HvStatus::INVALID_HYPERCALL_INPUT)?
        } else {
            read_input(self, regs.rdx)?
        };
        if input.connection_id & !hv::HV_CONNECTION_ID_MASK != 0
            || input.reserved != 0
            || u32::from(input.flag_number) >= hv::HV_EVENT_FLAGS_COUNT
        {
            return Err(HvStatus::INVALID_PARAMETER);
        }
        if !self.synic_enabled(vp) {
            return Err(HvStatus::ACCESS_DENIED);
        }
        Ok(HypercallOutcome::action(HypercallAction::SignalEvent(
            SignalEventRequest {
                vp,
                connection_id: input.connection_id,
                flag_number: input.flag_number,
            },
        )))
    }

    /// HvGetVpRegisters, answered only for VSM_VP_STATUS (= 0: VTL 0, no VSM), which some
    /// kernels query at boot. Any other register fails with INVALID_PARAMETER at that rep.
    fn get_vp_registers_call(
        &self,
        vp: u32,
        control: HypercallControl,
        regs: HypercallRegs,
    ) -> HypercallOutcome {
        let count = control.rep_count();
        let start = control.rep_start();
        let fail = |status| HypercallOutcome {
            status,
            reps_completed: start,
            action: None,
        };
        if count == 0 || start >= count || control.variable_header_size() != 0 || control.fast() {
            return fail(HvStatus::INVALID_HYPERCALL_INPUT);
        }
        let header_len = size_of::<HvGetVpRegistersInput>() as u64;
        let input_len = header_len + 4 * count as u64;
        let output_len = size_of::<HvRegisterValue>() as u64 * count as u64;
        if let Err(s) = check_block(self, regs.rdx, input_len)
            .and_then(|()| check_block(self, regs.r8, output_len))
        {
            return fail(s);
        }
        let mut input = vec![0u8; input_len as usize];
        if self.mem.read(regs.rdx, &mut input).is_err() {
            return fail(HvStatus::INVALID_HYPERCALL_INPUT);
        }
        let (header, names) = match HvGetVpRegistersInput::read_from_prefix(&input) {
            Ok(x) => x,
            Err(_) => return fail(HvStatus::INVALID_HYPERCALL_INPUT),
        };
        if header.partition_id != hv::HV_PARTITION_ID_SELF {
            return fail(HvStatus::INVALID_PARTITION_ID);
        }
        if header.vp_index != hv::HV_VP_INDEX_SELF && header.vp_index >= self.config.vp_count {
            return fail(HvStatus::INVALID_VP_INDEX);
        }
        if header.input_vtl != 0 || header.reserved != [0; 3] {
            return fail(HvStatus::INVALID_PARAMETER);
        }
        let mut done = start;
        let mut status = HvStatus::SUCCESS;
        for i in start..count {
            let off = 4 * i as usize;
            let name =
                u32::from_le_bytes([names[off], names[off + 1], names[off + 2], names[off + 3]]);
            let value = match name {
                hv::HV_REGISTER_VSM_VP_STATUS => HvRegisterValue::default(),
                _ => {
                    if self.log_limit.allow() {
                        tracing::info!(
                            vp,
                            name = format_args!("{name:#x}"),
                            "HvGetVpRegisters: unsupported register"
                        );
                    }
                    status = HvStatus::INVALID_PARAMETER;
                    break;
                }
            };
            let gpa = regs.r8 + 16 * i as u64;
            if self.mem.write(gpa, value.as_bytes()).is_err() {
                status = HvStatus::INVALID_HYPERCALL_INPUT;
                break;
            }
            done = i + 1;
        }
        HypercallOutcome {
            status,
            reps_completed: done,
            action: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{partition, RAM};
    use hvdef::hv::*;

    const INPUT: u64 = 0x2000;
    const OUTPUT: u64 = 0x3000;

    /// A partition with hypercalls and VP 0's SynIC enabled.
    fn ready() -> (std::sync::Arc<Partition>, guestmem::GuestMemory) {
        let (p, mem, _) = partition(2);
        p.msr_write(0, MSR_GUEST_OS_ID, 0x8100 << 48).unwrap();
        p.msr_write(0, MSR_HYPERCALL, 0x1001).unwrap();
        p.msr_write(0, MSR_SIMP, 0x5001).unwrap();
        p.msr_write(0, MSR_SCONTROL, 1).unwrap();
        (p, mem)
    }

    fn post_input(conn: u32, ty: u32, size: u32, payload: &[u8]) -> HvPostMessageInput {
        let mut i = HvPostMessageInput {
            connection_id: conn,
            reserved: 0,
            message_type: ty,
            payload_size: size,
            payload: [0; 240],
        };
        i.payload[..payload.len()].copy_from_slice(payload);
        i
    }

    fn call(p: &Partition, vp: u32, rcx: u64, rdx: u64, r8: u64) -> HypercallOutcome {
        p.hypercall(vp, HypercallRegs { rcx, rdx, r8 }).unwrap()
    }

    fn status(p: &Partition, vp: u32, rcx: u64, rdx: u64, r8: u64) -> HvStatus {
        let o = call(p, vp, rcx, rdx, r8);
        assert_eq!(o.action, None);
        o.status
    }

    #[test]
    fn disabled_hypercall_page_is_not_a_hypercall() {
        let regs = |rcx| HypercallRegs { rcx, rdx: 0, r8: 0 };
        let (p, _, _) = partition(1);
        assert_eq!(p.hypercall(0, regs(0x5C)), None);
        let (p, _) = ready();
        assert_eq!(p.hypercall(7, regs(0x5C)), None);
        assert!(p.hypercall(0, regs(0x99)).is_some());
        // GUEST_OS_ID = 0 (kexec cleanup) turns hypercalls off again.
        p.msr_write(0, MSR_GUEST_OS_ID, 0).unwrap();
        assert_eq!(p.hypercall(0, regs(0x99)), None);
    }

    #[test]
    fn post_message_success() {
        let (p, mem) = ready();
        mem.write_obj(INPUT, &post_input(4, 1, 5, b"hello"))
            .unwrap();
        let o = call(&p, 0, 0x5C, INPUT, 0);
        assert_eq!(o.status, HvStatus::SUCCESS);
        let Some(HypercallAction::PostMessage(m)) = o.action else {
            panic!("{o:?}")
        };
        assert_eq!((m.vp, m.connection_id, m.message_type), (0, 4, 1));
        assert_eq!(m.payload.as_slice(), b"hello");
        assert_eq!(o.rax(), 0);
        // The caller can turn it into another status.
        assert_eq!(o.rax_with(HvStatus::INVALID_CONNECTION_ID), 0x12);
        assert_eq!(o.rax_with(HvStatus::INSUFFICIENT_BUFFERS), 0x13);
        // Full 240-byte payload at the end of a page.
        mem.write_obj(0x2F00, &post_input(1, 0x7FFF_FFFF, 240, &[9; 240]))
            .unwrap();
        let o = call(&p, 0, 0x5C, 0x2F00, 0);
        let Some(HypercallAction::PostMessage(m)) = o.action else {
            panic!("{o:?}")
        };
        assert_eq!(m.payload.as_slice(), &[9; 240]);
    }

    #[test]
    fn post_message_hostile_inputs() {
        let (p, mem) = ready();
        mem.write_obj(INPUT, &post_input(4, 1, 241, b"")).unwrap();
        assert_eq!(status(&p, 0, 0x5C, INPUT, 0), HvStatus::INVALID_PARAMETER);
        mem.write_obj(INPUT, &post_input(4, 1, u32::MAX, b""))
            .unwrap();
        assert_eq!(status(&p, 0, 0x5C, INPUT, 0), HvStatus::INVALID_PARAMETER);
        mem.write_obj(INPUT, &post_input(4, 0, 0, b"")).unwrap();
        assert_eq!(status(&p, 0, 0x5C, INPUT, 0), HvStatus::INVALID_PARAMETER);
        mem.write_obj(INPUT, &post_input(4, 0x8000_0010, 0, b""))
            .unwrap();
        assert_eq!(status(&p, 0, 0x5C, INPUT, 0), HvStatus::INVALID_PARAMETER);
        mem.write_obj(INPUT, &post_input(0x0100_0004, 1, 0, b""))
            .unwrap();
        assert_eq!(status(&p, 0, 0x5C, INPUT, 0), HvStatus::INVALID_PARAMETER);
        let mut i = post_input(4, 1, 0, b"");
        i.reserved = 1;
        mem.write_obj(INPUT, &i).unwrap();
        assert_eq!(status(&p, 0, 0x5C, INPUT, 0), HvStatus::INVALID_PARAMETER);

        mem.write_obj(INPUT, &post_input(4, 1, 0, b"")).unwrap();
        // Misaligned.
        for off in 1..8 {
            assert_eq!(
                status(&p, 0, 0x5C, INPUT + off, 0),
                HvStatus::INVALID_ALIGNMENT
            );
        }
        // Crosses a page; outside RAM; overflowing address.
        assert_eq!(
            status(&p, 0, 0x5C, 0x2F08, 0),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        assert_eq!(
            status(&p, 0, 0x5C, RAM, 0),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        assert_eq!(
            status(&p, 0, 0x5C, !0xFFF, 0),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        // Fast, rep, rep start, variable header, reserved and nested bits.
        for rcx in [
            0x5C | control::FAST,
            0x5C | 1 << 32,
            0x5C | 1 << 48,
            0x5C | 1 << 17,
            0x5C | 1 << 27,
            0x5C | 1 << 31,
            0x5C | 1 << 44,
            0x5C | 1 << 63,
        ] {
            assert_eq!(
                status(&p, 0, rcx, INPUT, 0),
                HvStatus::INVALID_HYPERCALL_INPUT,
                "{rcx:#x}"
            );
        }
        // SynIC disabled on the caller (VP 1).
        assert_eq!(status(&p, 1, 0x5C, INPUT, 0), HvStatus::ACCESS_DENIED);
        // And still fine on VP 0.
        assert!(call(&p, 0, 0x5C, INPUT, 0).action.is_some());
    }

    #[test]
    fn signal_event_fast_and_slow() {
        let (p, mem) = ready();
        let o = call(&p, 0, 0x1005D, 0x0000_0000_0000_0017, 0);
        assert_eq!(
            o.action,
            Some(HypercallAction::SignalEvent(SignalEventRequest {
                vp: 0,
                connection_id: 0x17,
                flag_number: 0
            }))
        );
        let o = call(&p, 0, 0x1005D, 0x07FF_0000_2002, 0);
        assert_eq!(
            o.action,
            Some(HypercallAction::SignalEvent(SignalEventRequest {
                vp: 0,
                connection_id: 0x2002,
                flag_number: 0x7FF
            }))
        );
        // Slow form: 8 bytes at the input GPA.
        mem.write_obj(
            INPUT,
            &HvSignalEventInput {
                connection_id: 9,
                flag_number: 3,
                reserved: 0,
            },
        )
        .unwrap();
        let o = call(&p, 0, 0x5D, INPUT, 0);
        assert_eq!(
            o.action,
            Some(HypercallAction::SignalEvent(SignalEventRequest {
                vp: 0,
                connection_id: 9,
                flag_number: 3
            }))
        );
        assert_eq!(
            status(&p, 0, 0x5D, INPUT + 4, 0),
            HvStatus::INVALID_ALIGNMENT
        );
        assert_eq!(
            status(&p, 0, 0x5D, RAM - 8 + 0x1000, 0),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        // Bad fields.
        for rdx in [0x0800_0000_0001u64, 0x0100_0000, 1 << 48, 1 << 63] {
            assert_eq!(
                status(&p, 0, 0x1005D, rdx, 0),
                HvStatus::INVALID_PARAMETER,
                "{rdx:#x}"
            );
        }
        for rcx in [0x1005D | 1 << 32, 0x1005D | 1 << 17, 0x1005D | 1 << 30] {
            assert_eq!(status(&p, 0, rcx, 1, 0), HvStatus::INVALID_HYPERCALL_INPUT);
        }
        assert_eq!(status(&p, 1, 0x1005D, 1, 0), HvStatus::ACCESS_DENIED);
    }

    #[test]
    fn unknown_codes() {
        let (p, _) = ready();
        for code in [
            0u64, 1, 2, 3, 8, 0xB, 0x13, 0x46, 0x51, 0x5E, 0x8001, 0xFFFF,
        ] {
            for extra in [0, control::FAST, 5 << 32, 1 << 63] {
                let o = call(&p, 0, code | extra, 0, 0);
                assert_eq!(o.status, HvStatus::INVALID_HYPERCALL_CODE, "{code:#x}");
                assert_eq!(o.rax(), 2);
                assert_eq!(o.action, None);
            }
        }
    }

    fn vp_regs_input(mem: &guestmem::GuestMemory, partition: u64, vp: u32, names: &[u32]) {
        mem.write_obj(
            INPUT,
            &HvGetVpRegistersInput {
                partition_id: partition,
                vp_index: vp,
                input_vtl: 0,
                reserved: [0; 3],
            },
        )
        .unwrap();
        for (i, n) in names.iter().enumerate() {
            mem.write_obj(INPUT + 16 + 4 * i as u64, n).unwrap();
        }
    }

    #[test]
    fn get_vp_registers_rep() {
        let (p, mem) = ready();
        mem.write(OUTPUT, &[0xFF; 64]).unwrap();
        vp_regs_input(
            &mem,
            u64::MAX,
            HV_VP_INDEX_SELF,
            &[HV_REGISTER_VSM_VP_STATUS],
        );
        let o = call(&p, 0, 0x50 | 1 << 32, INPUT, OUTPUT);
        assert_eq!((o.status, o.reps_completed), (HvStatus::SUCCESS, 1));
        assert_eq!(o.rax(), 1 << 32);
        assert_eq!(mem.read_obj::<[u64; 2]>(OUTPUT).unwrap(), [0, 0]);

        // Second name unsupported: one rep done, then INVALID_PARAMETER.
        vp_regs_input(&mem, u64::MAX, 1, &[HV_REGISTER_VSM_VP_STATUS, 0x1234]);
        let o = call(&p, 0, 0x50 | 2 << 32, INPUT, OUTPUT);
        assert_eq!(
            (o.status, o.reps_completed),
            (HvStatus::INVALID_PARAMETER, 1)
        );
        // Restart at rep 1 (as a guest continues a rep call).
        let o = call(&p, 0, 0x50 | 2 << 32 | 1 << 48, INPUT, OUTPUT);
        assert_eq!(
            (o.status, o.reps_completed),
            (HvStatus::INVALID_PARAMETER, 1)
        );

        // Hostile shapes.
        let st = |rcx, rdx, r8| {
            let o = call(&p, 0, rcx, rdx, r8);
            o.status
        };
        assert_eq!(st(0x50, INPUT, OUTPUT), HvStatus::INVALID_HYPERCALL_INPUT);
        assert_eq!(
            st(0x50 | 1 << 32 | 1 << 48, INPUT, OUTPUT),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        assert_eq!(
            st(0x50 | 1 << 32 | control::FAST, INPUT, OUTPUT),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        assert_eq!(
            st(0x50 | 1 << 32, INPUT + 4, OUTPUT),
            HvStatus::INVALID_ALIGNMENT
        );
        assert_eq!(
            st(0x50 | 1 << 32, INPUT, OUTPUT + 4),
            HvStatus::INVALID_ALIGNMENT
        );
        // 0xFFF reps: input and output cannot fit in a page.
        assert_eq!(
            st(0x50 | 0xFFF << 32, INPUT, OUTPUT),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        assert_eq!(
            st(0x50 | 1 << 32, INPUT, RAM),
            HvStatus::INVALID_HYPERCALL_INPUT
        );
        vp_regs_input(&mem, 5, HV_VP_INDEX_SELF, &[HV_REGISTER_VSM_VP_STATUS]);
        assert_eq!(
            st(0x50 | 1 << 32, INPUT, OUTPUT),
            HvStatus::INVALID_PARTITION_ID
        );
        vp_regs_input(&mem, u64::MAX, 2, &[HV_REGISTER_VSM_VP_STATUS]);
        assert_eq!(
            st(0x50 | 1 << 32, INPUT, OUTPUT),
            HvStatus::INVALID_VP_INDEX
        );
    }
}
