//! The harness: for each stack, fresh images, an initial fill, the writer started and killed
//! with SIGKILL after a random delay, then every sector of every view of the stack checked
//! against the journal.

use super::journal;
use super::model::{Model, Violation};
use super::stamp::{INITIAL_WRITE, decode, stamp};
use disk_backend::Disk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{GuestMemory, MemoryRead, MemoryWrite, PagedRange, RequestBuffers};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A persistent stack the harness knows how to build, write and read back.
///
/// Specs are templates: `{a}` and `{b}` stand for two image files, `{loop_a}` for a loop
/// device over `{a}` (the stack then needs root), `{key}` for `@KEYFILE` with a 64-byte key.
pub struct StackDef {
    /// The name `--stacks` uses.
    pub name: &'static str,
    /// The stack the writer writes.
    pub write: &'static str,
    /// The stacks read back after each kill (read-only where the kind allows): the stack
    /// itself, and its members where they hold the same data (both files of a write-through
    /// layered disk, the file behind a loop device).
    pub check: &'static [&'static str],
    /// The stack keeps no volatile state of its own, so every acknowledged write must
    /// survive a SIGKILL, flushed or not. A stack with a write-back cache in the process
    /// (a qcow2 metadata cache) is checked against the durability contract only.
    pub process_crash_safe: bool,
    /// The command creating each image, `{image}` and `{size}` (bytes) substituted; `None`:
    /// a sparse file of the size.
    pub create: Option<&'static str>,
    /// A consistency check of each image after each kill, `{image}` substituted, which must
    /// exit 0 (clean) or 3 (`qemu-img check`: leaked clusters only, which a crash may leave).
    pub image_check: Option<&'static str>,
    /// Run when `--stacks` is not given. The control stacks, which must fail, are not.
    pub by_default: bool,
}

/// Every stack `cargo xtask crash` runs. A new persistent kind is one more entry.
pub const STACKS: &[StackDef] = &[
    // A qcow2 image made by qemu-img: its metadata cache lives in the process, so acknowledged
    // writes are owed only once flushed (or FUA); after every kill `qemu-img check` must find
    // no corruption (leaks allowed).
    StackDef {
        name: "qcow2",
        write: "qcow2({a})",
        check: &["qcow2({a}, ro)"],
        process_crash_safe: false,
        create: Some("qemu-img create -q -f qcow2 {image} {size}"),
        image_check: Some("qemu-img check -q -f qcow2 {image}"),
        by_default: true,
    },
    StackDef {
        name: "file",
        write: "file({a})",
        check: &["file({a}, ro)"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    StackDef {
        name: "blockdev",
        write: "blockdev({loop_a})",
        check: &["blockdev({loop_a}, ro)", "file({a}, ro)"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    // Through the page cache. `BLKDISCARD` drops the range's cached pages, dirty ones
    // included, before it reaches the device, so the disk writes the range back first: before
    // that, a kill between the two lost an acknowledged write in about 2% of kills
    // (crates/diskctl/tests/crash.rs keeps the regression test).
    StackDef {
        name: "blockdev-buffered",
        write: "blockdev({loop_a}, buffered)",
        check: &["blockdev({loop_a}, ro)", "file({a}, ro)"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    // The file backend on a block device, through the page cache (it ignores unmap there).
    StackDef {
        name: "file-on-loop",
        write: "file({loop_a})",
        check: &["file({loop_a}, ro)", "file({a}, ro)"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    StackDef {
        name: "file-4k",
        write: "file({a}, sector_size=4096)",
        check: &["file({a}, ro, sector_size=4096)"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    StackDef {
        name: "crypt",
        write: "crypt(file({a}), key={key})",
        check: &["crypt(file({a}, ro), key={key})"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    StackDef {
        name: "layered",
        write: "layered(layer(file({a}), write_through), file({b}))",
        check: &[
            "layered(file({a}, ro), file({b}, ro), ro)",
            "file({a}, ro)",
            "file({b}, ro)",
        ],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: true,
    },
    // The control: a RAM layer over a file keeps every write in the process, so each kill
    // loses the acknowledged (and flushed) ones. The harness must report it.
    StackDef {
        name: "ram-over-file",
        write: "layered(ram, file({a}))",
        check: &["file({a}, ro)"],
        process_crash_safe: true,
        create: None,
        image_check: None,
        by_default: false,
    },
];

/// `diskctl crash run`: which stacks, how often, how hard.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kills per stack.
    #[arg(long, default_value_t = 20)]
    pub iterations: u32,
    /// Comma-separated stack names (default: every persistent stack; `blockdev` only as
    /// root). `ram-over-file` is a control that must fail: it loses every write at a kill.
    #[arg(long, value_delimiter = ',')]
    pub stacks: Vec<String>,
    /// Seed of the workloads and kill delays; iteration `i` of a stack uses `seed + i`.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Longest delay, in milliseconds, between the writer's first journal record and the
    /// kill; each kill picks a delay uniformly up to it.
    #[arg(long, default_value_t = 300)]
    pub max_delay_ms: u64,
    /// Shortest such delay, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub min_delay_ms: u64,
    /// Size of each image (suffixes k, M).
    #[arg(long, default_value = "4M", value_parser = disk_backend::resolve::parse_size)]
    pub size: u64,
    /// Check process-crash consistency (every acknowledged write survives a kill) on every
    /// selected stack, also those checked against the durability contract only.
    #[arg(long)]
    pub process_crash: bool,
    /// The writer flushes before every unmap (to tell whether lost writes were dirty pages
    /// an unmap dropped).
    #[arg(long)]
    pub flush_before_unmap: bool,
    /// Requests the writer keeps in flight.
    #[arg(long, default_value_t = 8)]
    pub queue_depth: usize,
    /// Remove the files of a failing iteration too (by default they are kept, and their
    /// directory printed).
    #[arg(long)]
    pub no_keep: bool,
    /// Where to create the images and the journal (default: `/dev/shm` where it exists,
    /// else the temporary directory). On a disk, every flush, FUA write and journal record
    /// waits for the device, and a kill finds a few writes done instead of hundreds.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Totals of one stack.
#[derive(Default)]
struct Totals {
    iterations: u32,
    kills: u32,
    violations: u64,
    writes_acked: u64,
    fua_acked: u64,
    unmaps_acked: u64,
    flushes_done: u64,
    in_flight: u64,
    sectors_checked: u64,
}

/// Runs every selected stack; an error if any sector broke a property or a run failed.
pub fn run(args: &RunArgs) -> Result<(), String> {
    let selected: Vec<&StackDef> = if args.stacks.is_empty() {
        STACKS.iter().filter(|s| s.by_default).collect()
    } else {
        args.stacks
            .iter()
            .map(|name| {
                STACKS.iter().find(|s| s.name == name).ok_or_else(|| {
                    let names: Vec<&str> = STACKS.iter().map(|s| s.name).collect();
                    format!("no stack `{name}`; stacks: {}", names.join(", "))
                })
            })
            .collect::<Result<_, _>>()?
    };
    if args.size < 64 << 10 || !args.size.is_multiple_of(4096) {
        return Err("--size must be a multiple of 4 KiB, at least 64 KiB".into());
    }
    let mut failed = Vec::new();
    for stack in selected {
        if needs_root(stack) && !is_root() {
            if args.stacks.is_empty() {
                eprintln!("crash: {}: skipped: loop devices need root", stack.name);
                continue;
            }
            return Err(format!("{}: loop devices need root", stack.name));
        }
        let start = Instant::now();
        let result = run_stack(stack, args);
        let seconds = start.elapsed().as_secs_f64();
        match result {
            Ok(totals) => {
                let per = |n: u64| n as f64 / totals.kills.max(1) as f64;
                println!(
                    "{}: {} iterations, {} kills, {} violations, {:.1} s; per kill: {:.0} writes \
                     acknowledged ({:.0} FUA), {:.0} unmaps, {:.1} flushes completed, {:.1} \
                     requests in flight; {} sectors checked",
                    stack.name,
                    totals.iterations,
                    totals.kills,
                    totals.violations,
                    seconds,
                    per(totals.writes_acked),
                    per(totals.fua_acked),
                    per(totals.unmaps_acked),
                    per(totals.flushes_done),
                    per(totals.in_flight),
                    totals.sectors_checked,
                );
                if totals.violations > 0 {
                    failed.push(format!("{}: {} violations", stack.name, totals.violations));
                }
            }
            Err(message) => {
                println!("{}: failed after {seconds:.1} s: {message}", stack.name);
                failed.push(format!("{}: {message}", stack.name));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

fn needs_root(stack: &StackDef) -> bool {
    stack.write.contains("{loop_")
}

/// Whether this process runs as root (the real user id in `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
            .unwrap_or(false)
    })
}

fn run_stack(stack: &StackDef, args: &RunArgs) -> Result<Totals, String> {
    let mut totals = Totals::default();
    for iteration in 0..args.iterations {
        let seed = args.seed.wrapping_add(iteration as u64);
        let parent = args.dir.clone().unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
        let dir = tempfile::Builder::new()
            .prefix("diskctl-crash-")
            .tempdir_in(&parent)
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let outcome = Images::create(stack, dir.path(), args.size, seed)
            .and_then(|images| iterate(stack, &images, args, seed));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(message) => {
                let kept = keep(dir, args);
                return Err(format!(
                    "iteration {iteration} (seed {seed}): {message}{kept}"
                ));
            }
        };
        totals.iterations += 1;
        totals.kills += 1;
        let s = outcome.summary;
        totals.writes_acked += s.writes_acked;
        totals.fua_acked += s.fua_acked;
        totals.unmaps_acked += s.unmaps_acked;
        totals.flushes_done += s.flushes_done;
        totals.in_flight += s.in_flight;
        totals.sectors_checked += outcome.sectors_checked;
        if !outcome.violations.is_empty() {
            totals.violations += outcome.violations.len() as u64;
            let kept = keep(dir, args);
            println!(
                "{}: iteration {iteration} (seed {seed}, kill after {} us): {} violations{kept}",
                stack.name,
                outcome.delay.as_micros(),
                outcome.violations.len(),
            );
            for line in violation_lines(&outcome.violations).iter().take(20) {
                println!("  {line}");
            }
        }
        if (iteration + 1) % 50 == 0 && iteration + 1 < args.iterations {
            eprintln!("crash: {}: {} iterations", stack.name, iteration + 1);
        }
    }
    Ok(totals)
}

/// Keeps a failing iteration's directory unless `--no-keep`; says where.
fn keep(dir: tempfile::TempDir, args: &RunArgs) -> String {
    if args.no_keep {
        return String::new();
    }
    format!("; journal and images kept in {}", dir.keep().display())
}

/// One line per run of neighbouring sectors that broke the same rule the same way.
fn violation_lines(violations: &[(String, Violation)]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut run: Option<(&str, &Violation, u64)> = None;
    let same = |a: &Violation, b: &Violation| {
        (a.property, &a.allowed, a.found) == (b.property, &b.allowed, b.found)
            && !matches!(a.found, super::stamp::Content::Misplaced { .. })
    };
    for (view, violation) in violations {
        if let Some((run_view, first, last)) = run
            && run_view == view
            && last + 1 == violation.sector
            && same(first, violation)
        {
            run = Some((run_view, first, violation.sector));
            continue;
        }
        if let Some((run_view, first, last)) = run {
            lines.push(format!("{run_view}: {}", first.describe(last)));
        }
        run = Some((view, violation, violation.sector));
    }
    if let Some((run_view, first, last)) = run {
        lines.push(format!("{run_view}: {}", first.describe(last)));
    }
    lines
}

/// The files (and loop device) of one iteration, and its specs with them filled in.
struct Images {
    write_spec: String,
    check_specs: Vec<String>,
    /// The image files made for `{a}` and `{b}`.
    paths: Vec<PathBuf>,
    dir: PathBuf,
    /// Detached when the iteration ends.
    _loop_device: Option<LoopDevice>,
}

impl Images {
    fn create(stack: &StackDef, dir: &Path, size: u64, seed: u64) -> Result<Self, String> {
        let all: String = std::iter::once(stack.write)
            .chain(stack.check.iter().copied())
            .collect();
        let mut values: Vec<(String, String)> = Vec::new();
        let mut paths = Vec::new();
        for name in ["a", "b"] {
            if !all.contains(&format!("{{{name}}}")) && !all.contains(&format!("{{loop_{name}}}")) {
                continue;
            }
            let path = dir.join(format!("{name}.img"));
            create_image(stack, &path, size)?;
            values.push((name.into(), quote(&path.display().to_string())));
            paths.push(path);
        }
        let mut loop_device = None;
        if all.contains("{loop_a}") {
            let device = LoopDevice::attach(&dir.join("a.img"))?;
            values.push(("loop_a".into(), quote(&device.path)));
            loop_device = Some(device);
        }
        if all.contains("{key}") {
            let path = dir.join("key");
            // Two different random halves: XTS refuses equal ones.
            let mut rng = StdRng::seed_from_u64(seed);
            let key: Vec<u8> = (0..64).map(|_| rng.random()).collect();
            std::fs::write(&path, key).map_err(|e| format!("cannot write the key: {e}"))?;
            values.push(("key".into(), quote(&format!("@{}", path.display()))));
        }
        let fill = |template: &str| {
            values
                .iter()
                .fold(template.to_string(), |text, (name, value)| {
                    text.replace(&format!("{{{name}}}"), value)
                })
        };
        Ok(Self {
            write_spec: fill(stack.write),
            check_specs: stack.check.iter().map(|t| fill(t)).collect(),
            paths,
            dir: dir.to_path_buf(),
            _loop_device: loop_device,
        })
    }
}

fn create_image(stack: &StackDef, path: &Path, size: u64) -> Result<(), String> {
    match stack.create {
        None => std::fs::File::create_new(path)
            .and_then(|file| file.set_len(size))
            .map_err(|e| format!("cannot create {}: {e}", path.display())),
        Some(command) => {
            let words: Vec<String> = command
                .split_whitespace()
                .map(|word| {
                    word.replace("{image}", &path.display().to_string())
                        .replace("{size}", &size.to_string())
                })
                .collect();
            let (program, rest) = words.split_first().ok_or("empty create command")?;
            let output = Command::new(program)
                .args(rest)
                .output()
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "`{}` failed: {}",
                    words.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            Ok(())
        }
    }
}

/// Runs `command` on `path`; exit 0 (clean) and 3 (leaks only) pass.
fn check_image(command: &str, path: &Path) -> Result<(), String> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(|word| word.replace("{image}", &path.display().to_string()))
        .collect();
    let (program, rest) = words.split_first().ok_or("empty image check command")?;
    let output = Command::new(program)
        .args(rest)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match output.status.code() {
        Some(0 | 3) => Ok(()),
        _ => Err(format!(
            "`{}` found the image inconsistent ({}): {}{}",
            words.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// A spec's quoted text: `"..."` with `\` and `"` escaped.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self, String> {
        // Another test attaching at the same moment can take the free device between
        // `losetup -f` finding it and configuring it: try again.
        let mut failure = String::new();
        for _ in 0..5 {
            let output = Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(file)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if output.status.success() {
                return Ok(Self {
                    path: String::from_utf8_lossy(&output.stdout).trim().to_string(),
                });
            }
            failure = String::from_utf8_lossy(&output.stderr).trim().to_string();
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("losetup failed: {failure}"))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // The device can stay busy for a moment after its last user closed it.
        for _ in 0..50 {
            match Command::new("losetup").args(["-d", &self.path]).output() {
                Ok(output) if output.status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("crash: cannot detach {}", self.path);
    }
}

/// What one iteration found.
struct Outcome {
    summary: super::model::Summary,
    violations: Vec<(String, Violation)>,
    delay: Duration,
    sectors_checked: u64,
}

fn iterate(
    stack: &StackDef,
    images: &Images,
    args: &RunArgs,
    seed: u64,
) -> Result<Outcome, String> {
    fill_initial(&images.write_spec)?;
    // What every view holds before the writer starts, sector by sector, so that "unchanged"
    // is checked byte for byte whatever a fresh image reads as.
    let mut initial = Vec::new();
    for spec in &images.check_specs {
        let (disk, data) = read_all(spec)?;
        let sector_size = disk.sector_size() as usize;
        initial.push(
            data.chunks_exact(sector_size)
                .map(crc32fast::hash)
                .collect::<Vec<u32>>(),
        );
    }
    let journal_path = images.dir.join("journal");
    let stderr_path = images.dir.join("writer.stderr");
    let mut writer = Writer::start(images, args, seed, &journal_path, &stderr_path)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6b69_6c6c);
    let delay =
        Duration::from_micros(rng.random_range(
            args.min_delay_ms * 1000..=args.max_delay_ms.max(args.min_delay_ms) * 1000,
        ));
    writer.wait_for_header(&journal_path)?;
    std::thread::sleep(delay);
    writer.kill()?;
    if let Some(command) = stack.image_check {
        for path in &images.paths {
            check_image(command, path)?;
        }
    }
    let records = journal::read(&journal_path).map_err(|e| crate::stack::error_chain(&e))?;
    let model = Model::new(&records).map_err(|e| format!("the journal is inconsistent: {e}"))?;
    let mut violations = Vec::new();
    let mut sectors_checked = 0;
    for (spec, initial) in images.check_specs.iter().zip(&initial) {
        let (disk, data) = read_all(spec)?;
        let header = model.header();
        if (disk.sector_count(), disk.sector_size()) != (header.sector_count, header.sector_size) {
            return Err(format!(
                "{spec}: {} sectors of {} bytes, the writer saw {} of {}",
                disk.sector_count(),
                disk.sector_size(),
                header.sector_count,
                header.sector_size
            ));
        }
        let sector_size = disk.sector_size() as usize;
        for (sector, bytes) in data.chunks_exact(sector_size).enumerate() {
            let unchanged = crc32fast::hash(bytes) == initial[sector];
            let found = decode(bytes, sector as u64);
            if let Some(violation) = model.check(
                sector as u64,
                found,
                unchanged,
                stack.process_crash_safe || args.process_crash,
            ) {
                violations.push((spec.clone(), violation));
            }
        }
        sectors_checked += disk.sector_count();
    }
    Ok(Outcome {
        summary: model.summary(),
        violations,
        delay,
        sectors_checked,
    })
}

/// Sectors per request of the fill and the read-back.
const CHUNK_SECTORS: u64 = 256;

/// Stamps the first half of the disk with the initial write and flushes; the second half
/// stays as the fresh image reads (never written, where a format allocates on write).
fn fill_initial(spec: &str) -> Result<(), String> {
    let stack = crate::stack::open(Some(spec))?;
    let disk = &stack.disk;
    let sector_size = disk.sector_size() as usize;
    let memory = GuestMemory::allocate(CHUNK_SECTORS as usize * sector_size);
    let gpns: Vec<u64> =
        (0..(CHUNK_SECTORS * sector_size as u64).div_ceil(guestmem::PAGE_SIZE64)).collect();
    let mut data = vec![0u8; CHUNK_SECTORS as usize * sector_size];
    let half = disk.sector_count() / 2;
    let mut sector = 0;
    futures::executor::block_on(async {
        while sector < half {
            let count = CHUNK_SECTORS.min(half - sector);
            let bytes = count as usize * sector_size;
            for (i, buf) in data[..bytes].chunks_exact_mut(sector_size).enumerate() {
                stamp(buf, sector + i as u64, INITIAL_WRITE);
            }
            let range = PagedRange::new(0, bytes, &gpns).expect("the fill's pages hold it");
            RequestBuffers::new(&memory, range, true)
                .writer()
                .write(&data[..bytes])
                .expect("own memory");
            disk.write_vectored(&RequestBuffers::new(&memory, range, false), sector, false)
                .await
                .map_err(|e| format!("{spec}: initial fill: {}", crate::stack::error_chain(&e)))?;
            sector += count;
        }
        disk.sync_cache().await.map_err(|e| {
            format!(
                "{spec}: flush of the fill: {}",
                crate::stack::error_chain(&e)
            )
        })
    })
}

/// Opens `spec` and reads every sector.
fn read_all(spec: &str) -> Result<(Disk, Vec<u8>), String> {
    let stack = crate::stack::open(Some(spec))?;
    let disk = stack.disk.clone();
    let sector_size = disk.sector_size() as usize;
    let memory = GuestMemory::allocate(CHUNK_SECTORS as usize * sector_size);
    let gpns: Vec<u64> =
        (0..(CHUNK_SECTORS * sector_size as u64).div_ceil(guestmem::PAGE_SIZE64)).collect();
    let mut data = vec![0u8; disk.sector_count() as usize * sector_size];
    futures::executor::block_on(async {
        let mut sector = 0;
        while sector < disk.sector_count() {
            let count = CHUNK_SECTORS.min(disk.sector_count() - sector);
            let bytes = count as usize * sector_size;
            let range = PagedRange::new(0, bytes, &gpns).expect("the read's pages hold it");
            disk.read_vectored(&RequestBuffers::new(&memory, range, true), sector)
                .await
                .map_err(|e| format!("{spec}: read back: {}", crate::stack::error_chain(&e)))?;
            let at = sector as usize * sector_size;
            RequestBuffers::new(&memory, range, false)
                .reader()
                .read(&mut data[at..at + bytes])
                .expect("own memory");
            sector += count;
        }
        Ok::<_, String>(())
    })?;
    Ok((disk, data))
}

/// The writer process, killed on drop if still running.
struct Writer {
    child: Child,
    stderr_path: PathBuf,
}

impl Writer {
    fn start(
        images: &Images,
        args: &RunArgs,
        seed: u64,
        journal: &Path,
        stderr_path: &Path,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find diskctl: {e}"))?;
        let stderr = std::fs::File::create(stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let mut command = Command::new(exe);
        command
            .args(["crash", "writer", &images.write_spec, "--journal"])
            .arg(journal);
        if args.flush_before_unmap {
            command.arg("--flush-before-unmap");
        }
        let child = command
            .args(["--seed", &seed.to_string()])
            .args(["--queue-depth", &args.queue_depth.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start the writer: {e}"))?;
        Ok(Self {
            child,
            stderr_path: stderr_path.to_path_buf(),
        })
    }

    fn exited(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            return Err(format!(
                "the writer exited by itself ({status}): {}",
                stderr.trim()
            ));
        }
        Ok(())
    }

    /// Waits until the writer has opened the stack and written the journal's header.
    fn wait_for_header(&mut self, journal: &Path) -> Result<(), String> {
        // Generous: a loaded machine can take long to start a process.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.exited()?;
            if std::fs::read(journal).is_ok_and(|text| text.contains(&b'\n')) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the writer wrote no journal within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) -> Result<(), String> {
        self.exited()?;
        self.child
            .kill()
            .and_then(|()| self.child.wait())
            .map(drop)
            .map_err(|e| format!("cannot kill the writer: {e}"))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
