//! Browser bindings of fedsb, built with wasm-bindgen and loaded in a Web
//! Worker: the wire protocol, so the page speaks exactly the bytes the
//! aggregator decodes (one implementation, in `shared/protocol`), and the
//! engine on WebGPU ([`WasmEngine`]).
//!
//! Build: `cargo xtask build-wasm` (a release build for
//! `wasm32-unknown-unknown`, then `wasm-bindgen --target web` into
//! `www/pkg/`). `www/tests/embed.html` uses it; `tests/tests/browser_embed.rs`
//! runs that page in headless Chromium.

use fedsb_protocol::{ClientMessage, ClientUpdate, ServerMessage, PROTOCOL_VERSION};
use wasm_bindgen::prelude::*;

mod engine;
mod participant;

pub use engine::{embed_by_length, EngineError, WasmEngine};
pub use participant::{preview_data, RoundResult, WasmParticipant};

/// Runs when the module is instantiated: panics are printed to the console
/// with their message instead of an opaque `unreachable`.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The protocol version this build speaks.
#[wasm_bindgen(js_name = protocolVersion)]
pub fn protocol_version() -> u16 {
    PROTOCOL_VERSION
}

/// The `Hello` frame that opens every connection. `participant_key`: the
/// secret this tab keeps with its data (16 to 128 ASCII letters, digits, `-`
/// or `_`), or `null` for a new participant on every connection.
#[wasm_bindgen(js_name = encodeHello)]
pub fn encode_hello(client: &str, participant_key: Option<String>) -> Result<Vec<u8>, JsError> {
    if let Some(k) = &participant_key {
        fedsb_protocol::check_participant_key(k)
            .map_err(|e| JsError::new(&format!("invalid participant key: {e}")))?;
    }
    Ok(ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client: client.to_owned(),
        participant_key,
    }
    .encode())
}

/// The `Leave` frame.
#[wasm_bindgen(js_name = encodeLeave)]
pub fn encode_leave(reason: &str) -> Vec<u8> {
    ClientMessage::Leave {
        reason: reason.to_owned(),
    }
    .encode()
}

/// Encodes an update given as a JS object shaped like `ClientUpdate`
/// (`{round, num_samples, train_loss, privacy, adapter: {r, head_weight,
/// head_bias}}`, tensors as `{shape, data}`).
#[wasm_bindgen(js_name = encodeUpdate)]
pub fn encode_update(update: JsValue) -> Result<Vec<u8>, JsError> {
    let update: ClientUpdate = serde_wasm_bindgen::from_value(update)
        .map_err(|e| JsError::new(&format!("invalid update object: {e}")))?;
    Ok(ClientMessage::Update(update).encode())
}

/// Decodes a frame from the aggregator into a JS object tagged by `type`
/// (`welcome`, `global_model`, `round_open`, `update_accepted`, `error`,
/// `task_finished`).
#[wasm_bindgen(js_name = decodeServerMessage)]
pub fn decode_server_message(frame: &[u8]) -> Result<JsValue, JsError> {
    let msg = ServerMessage::decode(frame)
        .map_err(|e| JsError::new(&format!("cannot decode server frame: {e}")))?;
    serde_wasm_bindgen::to_value(&msg).map_err(|e| JsError::new(&e.to_string()))
}

/// How the engine's wgpu sees its adapter, for the page: the name (browsers
/// usually leave the description wgpu reads empty), the device type that
/// picks the kernels (`Cpu` for a software fallback such as SwiftShader, which
/// gets the kernels chosen for CPU adapters) and the subgroup sizes.
pub(crate) fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let name = if info.name.is_empty() {
        "unnamed"
    } else {
        &info.name
    };
    format!(
        "{name} ({:?} {:?} adapter, subgroups of {}–{})",
        info.backend, info.device_type, info.subgroup_min_size, info.subgroup_max_size
    )
}

#[cfg(test)]
mod tests {
    use super::describe_adapter;

    #[test]
    fn an_adapter_is_described_with_its_device_type_even_without_a_name() {
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::BrowserWebGpu);
        info.name = String::new();
        info.subgroup_min_size = 4;
        info.subgroup_max_size = 4;
        assert_eq!(
            describe_adapter(&info),
            "unnamed (BrowserWebGpu Cpu adapter, subgroups of 4–4)"
        );
        info.name = "NVIDIA H100".into();
        info.device_type = wgpu::DeviceType::DiscreteGpu;
        info.subgroup_max_size = 32;
        info.subgroup_min_size = 32;
        assert_eq!(
            describe_adapter(&info),
            "NVIDIA H100 (BrowserWebGpu DiscreteGpu adapter, subgroups of 32–32)"
        );
    }
}
