//! Decompression of compressed clusters (raw deflate, zstd).

use crate::header::CompressionType;
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

/// Decompresses `input` (the compressed data of one cluster, possibly followed by padding up
/// to the end of its last sector) into `out`, which is one cluster. Succeeds only if the
/// whole cluster comes out; memory stays bounded by the cluster size whatever the input.
pub fn decompress_cluster(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    let mut state = Box::new(DecompressorOxide::new());
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut state, input, out, 0, flags);
    // QEMU accepts a stream that fills the cluster, ended or not (trailing bytes are padding).
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput
            if written == out.len() =>
        {
            Ok(())
        }
        _ => Err(()),
    }
}

fn unzstd(mut input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
    use std::io::Read;
    let mut decoder = FrameDecoder::new();
    decoder.init(&mut input).map_err(|_| ())?;
    let mut written = 0;
    while written < out.len() {
        let want = out.len() - written;
        decoder
            .decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(want))
            .map_err(|_| ())?;
        let n = decoder.read(&mut out[written..]).map_err(|_| ())?;
        written += n;
        if n == 0 && (decoder.is_finished() || input.is_empty()) {
            break;
        }
    }
    if written == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_and_zstd_round_trip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let mut packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        packed.extend_from_slice(&[0xaa; 300]); // sector padding
        let mut out = vec![0; 65536];
        decompress_cluster(CompressionType::Deflate, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress_cluster(CompressionType::Deflate, &packed[..100], &mut out).is_err());
        assert!(decompress_cluster(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());

        let packed = ruzstd::encoding::compress_to_vec(
            &data[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut out = vec![0; 65536];
        decompress_cluster(CompressionType::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress_cluster(CompressionType::Zstd, &packed[..10], &mut out).is_err());
        assert!(decompress_cluster(CompressionType::Zstd, &[0; 64], &mut out).is_err());
    }
}
