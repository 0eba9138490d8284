//! A qcow2 image with corrupted metadata (or arbitrary bytes), opened read-only and
//! writable, then read, written, unmapped, flushed and resized. The oracle: every call
//! returns (an error is fine), nothing panics, hangs or allocates without bound, and a
//! request outside the disk fails with `IllegalBlock`.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use disk_backend::{Disk, DiskError, DiskIo};
use disk_layered::{DiskLayer, LayerConfiguration, LayeredDisk};
use disk_qcow2::{CreateOptions, ImageFile, Qcow2Attach, Qcow2Layer, Qcow2Options};
use disk_ram::RamDisk;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use request_buffers::OwnedRequestBuffers;
use std::sync::Arc;

/// The host: 2 MiB of RAM, so the image (and every table it claims) stays small.
const HOST_SECTORS: u64 = 4096;

#[derive(Debug, Arbitrary)]
enum Op {
    Read {
        sector: u16,
        sectors: u8,
    },
    Write {
        sector: u16,
        sectors: u8,
        value: u8,
        fua: bool,
    },
    Unmap {
        sector: u16,
        sectors: u16,
    },
    Flush,
    Grow {
        sectors: u16,
    },
}

#[derive(Debug)]
struct Input {
    /// Arbitrary bytes instead of a valid image to corrupt.
    raw: Option<Vec<u8>>,
    cluster_bits: u32,
    refcount_order: u32,
    version: u32,
    /// Byte offsets into the image to XOR with a value.
    patches: Vec<(u32, u8)>,
    ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let raw = if u.ratio(1, 8)? {
            let len = u.int_in_range(0..=8192usize)?;
            Some(u.bytes(len.min(u.len()))?.to_vec())
        } else {
            None
        };
        let version = if u.arbitrary()? { 3 } else { 2 };
        Ok(Self {
            raw,
            cluster_bits: *u.choose(&[9, 12, 16])?,
            refcount_order: if version == 2 {
                4
            } else {
                u.int_in_range(0..=6)?
            },
            version,
            patches: u.arbitrary_iter()?.take(16).collect::<Result<_, _>>()?,
            ops: u.arbitrary_iter()?.take(32).collect::<Result<_, _>>()?,
        })
    }
}

fn image(input: &Input) -> Disk {
    let host = Disk::new(RamDisk::new(HOST_SECTORS, 512).unwrap()).unwrap();
    let mut bytes = vec![0u8; (HOST_SECTORS * 512) as usize];
    if let Some(raw) = &input.raw {
        bytes[..raw.len()].copy_from_slice(raw);
    } else {
        let file = ImageFile::new(host.clone(), None);
        let options = CreateOptions {
            size: 1 << 20,
            cluster_bits: input.cluster_bits,
            refcount_order: input.refcount_order,
            version: input.version,
        };
        block_on(async {
            Qcow2Layer::create(&file, &options).await.unwrap();
            // Some data, so there are L2 tables and refcounts to corrupt.
            let layer = Qcow2Layer::open(file, &Qcow2Options::default())
                .await
                .unwrap();
            let data = OwnedRequestBuffers::from_slice(&[0x5a; 4096]);
            use disk_layered::LayerIo;
            layer.write(&data.buffers(false), 0, false).await.unwrap();
            layer
                .write(&data.buffers(false), 1000, false)
                .await
                .unwrap();
            layer.sync_cache().await.unwrap();
        });
        let buf = OwnedRequestBuffers::new(bytes.len());
        block_on(host.read_vectored(&buf.buffers(true), 0)).unwrap();
        bytes = buf.to_vec();
        // Most patches land in the metadata at the start of the image.
        let metadata = (8u32 << input.cluster_bits) as usize;
        for &(at, value) in &input.patches {
            let at = at as usize % metadata.min(bytes.len());
            bytes[at] ^= value;
        }
    }
    let buf = OwnedRequestBuffers::from_slice(&bytes);
    block_on(host.write_vectored(&buf.buffers(false), 0, false)).unwrap();
    host
}

fuzz_target!(|input: Input| {
    let host = image(&input);
    for read_only in [true, false] {
        let options = Qcow2Options {
            read_only,
            cache_bytes: 0,
        };
        let Ok(layer) = block_on(Qcow2Layer::open(
            ImageFile::new(host.clone(), None),
            &options,
        )) else {
            continue;
        };
        let layer = Arc::new(layer);
        let Ok(disk) = LayeredDisk::new(
            read_only,
            vec![LayerConfiguration::new(DiskLayer::new(Qcow2Attach(
                layer.clone(),
            )))],
        ) else {
            continue;
        };
        block_on(async {
            for op in &input.ops {
                match *op {
                    Op::Read { sector, sectors } => {
                        let buf = OwnedRequestBuffers::new(sectors as usize * 512);
                        let result = disk.read_vectored(&buf.buffers(true), sector as u64).await;
                        if sector as u64 + sectors as u64 > disk.sector_count() {
                            assert!(matches!(result, Err(DiskError::IllegalBlock)));
                        }
                    }
                    Op::Write {
                        sector,
                        sectors,
                        value,
                        fua,
                    } => {
                        let buf =
                            OwnedRequestBuffers::from_slice(&vec![value; sectors as usize * 512]);
                        let _ = disk
                            .write_vectored(&buf.buffers(false), sector as u64, fua)
                            .await;
                    }
                    Op::Unmap { sector, sectors } => {
                        let _ = disk.unmap(sector as u64, sectors as u64, false).await;
                    }
                    Op::Flush => {
                        let _ = disk.sync_cache().await;
                    }
                    Op::Grow { sectors } => {
                        let count = disk.sector_count();
                        let _ = layer.resize((count + sectors as u64) * 512).await;
                    }
                }
            }
        });
    }
});
