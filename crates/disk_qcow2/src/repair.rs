//! Rebuilding the refcounts of a dirty image (lazy refcounts, not closed cleanly).

use crate::entry::{Mapping, OFFSET_MASK, compressed_clusters, decode_l2, get_u64, max_refcount};
use crate::error::{CorruptImage, OpenError};
use crate::header::{Header, MAX_REFTABLE_BYTES, field, incompatible};
use crate::host::ImageFile;
use crate::meta::{Geometry, update_header};

/// The most clusters a rebuild counts (4 bytes each in memory: 64 MiB; a 1 TiB file of
/// 64 KiB clusters).
const MAX_CLUSTERS: u64 = 1 << 24;

/// Counts the references to every cluster from the header, the L1 table, the L2 tables and
/// the data clusters they point at; writes a new refcount table and blocks after the end of
/// everything in use, makes them durable, points the header at them and clears the dirty
/// bit. The old refcount structures become free space. Returns the new refcount table's
/// offset and clusters.
pub(crate) async fn rebuild_refcounts(
    file: &ImageFile,
    header: &Header,
    g: &Geometry,
    l1: &[u64],
) -> Result<(u64, u32), OpenError> {
    let cs = g.cluster_size;
    let io = OpenError::Io;
    let file_size = file.size();
    let file_clusters = file_size.div_ceil(cs) + 1;
    if file_clusters > MAX_CLUSTERS {
        return Err(OpenError::NotWritable(
            "the image is too large to repair its refcounts here",
        ));
    }
    let mut counts = vec![0u32; file_clusters as usize];
    let bad = |what, index, offset| {
        OpenError::Corrupt(CorruptImage::BadPointer {
            what,
            index,
            offset,
        })
    };
    let mut count = |offset: u64, what, index| -> Result<(), OpenError> {
        let c = (offset / cs) as usize;
        match counts.get_mut(c) {
            Some(n) => {
                *n = n.saturating_add(1);
                Ok(())
            }
            None => Err(bad(what, index, offset)),
        }
    };
    count(0, "header", 0)?;
    let l1_bytes = (header.l1_size as u64 * 8).next_multiple_of(cs);
    for c in 0..l1_bytes / cs {
        count(header.l1_table_offset + c * cs, "l1 table", c)?;
    }
    for (i, &entry) in l1.iter().enumerate() {
        let table = entry & OFFSET_MASK;
        if table == 0 {
            continue;
        }
        if !table.is_multiple_of(cs) || table > file_size {
            return Err(bad("l1", i as u64, table));
        }
        count(table, "l1", i as u64)?;
        let data = file.read(table, cs as usize).await.map_err(io)?;
        for j in 0..(cs / 8) as usize {
            let index = ((i as u64) << g.l2_bits) + j as u64;
            match decode_l2(get_u64(&data, j), g.cluster_bits, g.zero_flag) {
                Mapping::Data { host, .. } | Mapping::Zero { prealloc: host } if host != 0 => {
                    if !host.is_multiple_of(cs) {
                        return Err(bad("l2", index, host));
                    }
                    count(host, "l2", index)?;
                }
                Mapping::Compressed { offset, len } => {
                    for c in compressed_clusters(offset, len, g.cluster_bits) {
                        count(c, "l2", index)?;
                    }
                }
                _ => {}
            }
        }
    }
    let max = max_refcount(g.refcount_order);
    if let Some(c) = counts.iter().position(|&n| n as u64 > max) {
        return Err(OpenError::Corrupt(CorruptImage::RefcountOverflow {
            offset: c as u64 * cs,
        }));
    }

    // The new table and blocks go after the last cluster in use, and count themselves.
    let start = counts
        .iter()
        .rposition(|&n| n > 0)
        .map_or(1, |c| c as u64 + 1);
    let per_block = 1u64 << g.refblock_bits;
    let (mut table, mut blocks) = (1u64, 1u64);
    loop {
        let end = start + table + blocks;
        let need_blocks = end.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks <= blocks && need_table <= table {
            break;
        }
        blocks = blocks.max(need_blocks);
        table = table.max(need_table);
    }
    if table * cs > MAX_REFTABLE_BYTES {
        return Err(OpenError::Corrupt(CorruptImage::RefcountTableFull));
    }
    let table_offset = start * cs;
    let blocks_offset = table_offset + table * cs;
    let end = start + table + blocks;
    file.ensure_size(end * cs).await.map_err(io)?;

    let mut table_bytes = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        crate::entry::set_u64(&mut table_bytes, b as usize, blocks_offset + b * cs);
    }
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per_block {
            let c = b * per_block + i;
            let n = if c >= start && c < end {
                1
            } else {
                counts.get(c as usize).copied().unwrap_or(0) as u64
            };
            if n != 0 {
                crate::entry::set_refcount(&mut block, i as usize, g.refcount_order, n);
            }
        }
        file.write(blocks_offset + b * cs, &block, false)
            .await
            .map_err(io)?;
    }
    file.write(table_offset, &table_bytes, false)
        .await
        .map_err(io)?;
    file.flush().await.map_err(io)?;
    update_header(
        file,
        &[
            (
                field::REFCOUNT_TABLE_OFFSET,
                table_offset.to_be_bytes().to_vec(),
            ),
            (
                field::REFCOUNT_TABLE_CLUSTERS,
                (table as u32).to_be_bytes().to_vec(),
            ),
            (
                field::INCOMPATIBLE,
                (header.incompatible_features & !incompatible::DIRTY)
                    .to_be_bytes()
                    .to_vec(),
            ),
        ],
    )
    .await
    .map_err(io)?;
    file.flush().await.map_err(io)?;
    Ok((table_offset, table as u32))
}
