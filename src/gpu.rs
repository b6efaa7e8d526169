//! CUDA devices for population evaluation: each ordinal is opened once per process and kept, so
//! that evaluations and autotune samples share one context, its loaded kernels and its cuBLAS
//! handle; and what the system profile says of a GPU.
//!
//! Without the `cuda` feature every device here is absent: [`cuda`] says how to build with it,
//! and [`probe`] finds none.

use candle_core::Device;

use crate::error::Result;

/// What the system profile records of one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GpuInfo {
    /// The device's name (`NVIDIA H200`).
    pub name: String,
    /// Its memory, bytes.
    pub total_bytes: u64,
}

/// The CUDA device `ordinal`, opened on first use and kept for the process.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] when this build has no CUDA support or the device cannot be opened
/// (no such GPU, no driver).
pub(crate) fn cuda(ordinal: usize) -> Result<Device> {
    imp::cuda(ordinal)
}

/// The GPU at `ordinal`, if this build can use one and it opens (probed once per process).
pub(crate) fn probe(ordinal: usize) -> Option<GpuInfo> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<usize, Option<GpuInfo>>>> = OnceLock::new();
    let mut seen = crate::system::lock(SEEN.get_or_init(Default::default));
    seen.entry(ordinal)
        .or_insert_with(|| imp::info(ordinal))
        .clone()
}

/// Free memory on `device` now, bytes (`None` off CUDA or when the driver does not say).
pub(crate) fn free_bytes(device: &Device) -> Option<u64> {
    imp::free_bytes(device)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use candle_core::Device;

    use super::GpuInfo;
    use crate::error::{Error, Result};

    pub(super) fn cuda(ordinal: usize) -> Result<Device> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
        let mut open = crate::system::lock(OPEN.get_or_init(Default::default));
        if let Some(d) = open.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Device::new_cuda(ordinal).map_err(|e| {
            Error::config(
                "device",
                format!("cannot open CUDA device {ordinal}: {e} (is a GPU and its driver there?)"),
            )
        })?;
        open.insert(ordinal, d.clone());
        Ok(d)
    }

    pub(super) fn info(ordinal: usize) -> Option<GpuInfo> {
        let Ok(Device::Cuda(d)) = cuda(ordinal) else {
            return None;
        };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        Some(GpuInfo {
            name: ctx.name().unwrap_or_else(|_| "unknown CUDA device".into()),
            total_bytes: ctx.total_mem().map_or(0, |b| b as u64),
        })
    }

    pub(super) fn free_bytes(device: &Device) -> Option<u64> {
        match device {
            Device::Cuda(d) => d
                .cuda_stream()
                .context()
                .mem_get_info()
                .ok()
                .map(|(free, _)| free as u64),
            _ => None,
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    use super::GpuInfo;
    use crate::error::{Error, Result};

    pub(super) fn cuda(ordinal: usize) -> Result<Device> {
        Err(Error::config(
            "device",
            format!(
                "CUDA device {ordinal} asked for, but this build of hyperfunc has no CUDA \
                 support: build it with `--features cuda`"
            ),
        ))
    }

    pub(super) fn info(_ordinal: usize) -> Option<GpuInfo> {
        None
    }

    pub(super) fn free_bytes(_device: &Device) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    /// A build without CUDA finds no GPU and says, when one is asked for, how to get one.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_a_gpu_is_absent_and_asking_for_one_says_how_to_build() {
        assert_eq!(super::probe(0), None);
        let e = super::cuda(0)
            .expect_err("no CUDA in this build")
            .to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert_eq!(super::free_bytes(&candle_core::Device::Cpu), None);
    }
}
