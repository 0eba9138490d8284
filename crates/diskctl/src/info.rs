//! `diskctl info`.

use disk_backend::resolve::{DiskSpec, SpecValue};
use disk_backend::{Disk, UnmapBehavior};
use serde::Serialize;

/// What `diskctl info` reports.
#[derive(Serialize)]
pub struct Info {
    /// The spec in canonical form.
    pub spec: String,
    /// The spec as a tree.
    pub tree: DiskSpec,
    /// The disk type at the root.
    pub disk_type: String,
    /// Sectors.
    pub sector_count: u64,
    /// Logical sector size.
    pub sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Read-only.
    pub read_only: bool,
    /// FUA writes are durable on completion.
    pub fua_respected: bool,
    /// `zeroes`, `unspecified` or `ignored`.
    pub unmap_behavior: &'static str,
    /// Preferred unmap granularity in sectors.
    pub optimal_unmap_sectors: u32,
    /// Whether persistent reservations are available.
    pub persistent_reservations: bool,
    /// The disk id in hex, if any.
    pub disk_id: Option<String>,
    /// What the headers of the stack's qcow2 images say.
    pub qcow2_images: Vec<Qcow2Image>,
}

/// The header of one qcow2 image in the stack.
#[derive(Serialize)]
pub struct Qcow2Image {
    /// The path in the spec.
    pub path: String,
    /// qcow2 version (2 or 3), or `None` if the header could not be read.
    pub version: Option<u32>,
    /// Cluster size in bytes.
    pub cluster_size: Option<u64>,
    /// The backing file the header names: reported, never opened (the layers below come
    /// from the spec).
    pub backing_file: Option<String>,
    /// Why the header could not be read.
    pub error: Option<String>,
}

impl Qcow2Image {
    fn read(path: &str) -> Self {
        let parsed = (|| {
            use std::io::Read;
            let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
            let len = file.metadata().map_err(|e| e.to_string())?.len();
            let mut first = Vec::new();
            file.by_ref()
                .take(2 << 20)
                .read_to_end(&mut first)
                .map_err(|e| e.to_string())?;
            disk_qcow2::header::Header::parse(&first, len).map_err(|e| e.to_string())
        })();
        match parsed {
            Ok(header) => Self {
                path: path.to_owned(),
                version: Some(header.version),
                cluster_size: Some(header.cluster_size()),
                backing_file: header.backing_file,
                error: None,
            },
            Err(error) => Self {
                path: path.to_owned(),
                version: None,
                cluster_size: None,
                backing_file: None,
                error: Some(error),
            },
        }
    }
}

/// The qcow2 images a spec names (the first positional argument of `qcow2` nodes).
fn qcow2_images(spec: &DiskSpec, out: &mut Vec<Qcow2Image>) {
    if spec.kind == "qcow2"
        && let Some(path) = spec
            .args
            .iter()
            .find_map(|arg| match (&arg.name, &arg.value) {
                (None, SpecValue::Text(text)) if text != "ro" && text != "direct" => Some(text),
                _ => None,
            })
    {
        out.push(Qcow2Image::read(path));
    }
    for arg in &spec.args {
        if let SpecValue::Disk(child) = &arg.value {
            qcow2_images(child, out);
        }
    }
}

impl Info {
    pub fn new(disk: &Disk, spec: &DiskSpec) -> Self {
        Self {
            spec: spec.to_string(),
            tree: spec.clone(),
            disk_type: disk.disk_type().to_owned(),
            sector_count: disk.sector_count(),
            sector_size: disk.sector_size(),
            physical_sector_size: disk.physical_sector_size(),
            size_bytes: disk
                .sector_count()
                .saturating_mul(disk.sector_size() as u64),
            read_only: disk.is_read_only(),
            fua_respected: disk.is_fua_respected(),
            unmap_behavior: match disk.unmap_behavior() {
                UnmapBehavior::Zeroes => "zeroes",
                UnmapBehavior::Unspecified => "unspecified",
                UnmapBehavior::Ignored => "ignored",
            },
            optimal_unmap_sectors: disk.optimal_unmap_sectors(),
            persistent_reservations: disk.pr().is_some(),
            disk_id: disk
                .disk_id()
                .map(|id| id.iter().map(|b| format!("{b:02x}")).collect()),
            qcow2_images: {
                let mut images = Vec::new();
                qcow2_images(spec, &mut images);
                images
            },
        }
    }
}

fn tree(out: &mut String, spec: &DiskSpec, depth: usize) {
    let mut line = format!("{}{}", "  ".repeat(depth), spec.kind);
    let mut children = Vec::new();
    for arg in &spec.args {
        match (&arg.name, &arg.value) {
            (Some(name), SpecValue::Text(text)) => line.push_str(&format!(" {name}={text}")),
            (None, SpecValue::Text(text)) => line.push_str(&format!(" {text}")),
            (name, SpecValue::Disk(child)) => children.push((name.clone(), child)),
        }
    }
    out.push_str(&line);
    out.push('\n');
    for (name, child) in children {
        if let Some(name) = name {
            out.push_str(&format!("{}{name}:\n", "  ".repeat(depth + 1)));
        }
        tree(out, child, depth + 1);
    }
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut layout = String::new();
        tree(&mut layout, &self.tree, 1);
        writeln!(f, "spec:                 {}", self.spec)?;
        write!(f, "tree:\n{layout}")?;
        writeln!(f, "type:                 {}", self.disk_type)?;
        writeln!(
            f,
            "size:                 {} sectors of {} bytes ({:.1} MiB)",
            self.sector_count,
            self.sector_size,
            self.size_bytes as f64 / (1 << 20) as f64
        )?;
        writeln!(f, "physical sector size: {}", self.physical_sector_size)?;
        writeln!(f, "read-only:            {}", yes_no(self.read_only))?;
        writeln!(f, "FUA respected:        {}", yes_no(self.fua_respected))?;
        writeln!(
            f,
            "unmap:                {} (granularity {} sectors)",
            self.unmap_behavior, self.optimal_unmap_sectors
        )?;
        writeln!(
            f,
            "reservations:         {}",
            if self.persistent_reservations {
                "supported"
            } else {
                "none"
            }
        )?;
        write!(
            f,
            "disk id:              {}",
            self.disk_id.as_deref().unwrap_or("none")
        )?;
        for image in &self.qcow2_images {
            write!(f, "\nqcow2:                {}: ", image.path)?;
            match (&image.error, image.version, image.cluster_size) {
                (Some(error), _, _) => write!(f, "{error}")?,
                (None, Some(version), Some(cluster_size)) => {
                    write!(f, "version {version}, {cluster_size}-byte clusters")?;
                    if let Some(backing) = &image.backing_file {
                        write!(f, ", names backing file {backing} (not followed)")?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
