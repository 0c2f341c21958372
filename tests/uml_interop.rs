//! Interoperability with real User-Mode Linux (`linux.uml`) and uml-utilities
//! (`uml_mkcow`, `uml_moo`): overlays made by `ubd` (and written through its
//! `Device`) must boot in UML and read there as written, and overlays UML
//! wrote must read back correctly through `ubd` (its tools and its `Device`).
//!
//! Needs `user-mode-linux`, `uml-utilities`, `busybox-static` and `e2fsprogs`;
//! fails with a message naming the package when one is missing.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{run, run_bytes, sha256_hex, tool, ubd, ubd_info, uml};
use serde_json::Value;
use ubd::device::{Device, DeviceOptions, Extent, Flags};

/// Upper bound for one boot; a normal one takes about 1.5 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// SHA-256 and modification time of a file, to prove a backing file untouched.
fn fingerprint(path: &Path) -> (String, SystemTime) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (sha256_hex(&data), mtime)
}

fn info_u64(info: &Value, key: &str) -> u64 {
    info.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("`ubd info` JSON has no unsigned integer `{key}`: {info}"))
}

fn info_str<'a>(info: &'a Value, key: &str) -> &'a str {
    info.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("`ubd info` JSON has no string `{key}`: {info}"))
}

fn info_bool(info: &Value, key: &str) -> bool {
    info.get(key)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("`ubd info` JSON has no boolean `{key}`: {info}"))
}

/// `uml_moo COW MERGED`: merges an overlay with the backing file its header names.
fn uml_moo(cow: &Path, merged: &Path) {
    run(Command::new(tool("uml_moo", "uml-utilities"))
        .arg(cow)
        .arg(merged));
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Files the guest creates in test (a): name and size. `odd` is not a multiple
/// of 4096 (nor of 512), `big` is a few hundred KiB.
const GUEST_FILES: &[(&str, usize)] = &[
    ("tiny", 1),
    ("odd", 7001),
    ("pages", 16384),
    ("big", 393_216),
];

#[test]
fn ubd_overlay_boots_in_uml_and_uml_moo_merges_it() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let base = dir.path().join("base.img");
    let cow = dir.path().join("cow.img");
    let merged = dir.path().join("merged.img");

    // Random files are made and hashed in tmpfs first, so the sums do not
    // depend on the overlay; then copied to the root fs (through the overlay).
    let specs: Vec<String> = GUEST_FILES
        .iter()
        .map(|(n, s)| format!("{n}:{s}"))
        .collect();
    let body = format!(
        r#"mkdir -p /tmp/gen /data
: > /tmp/sums
for spec in {specs}; do
    name=${{spec%%:*}}
    size=${{spec#*:}}
    head -c "$size" /dev/urandom > "/tmp/gen/$name"
    [ "$(stat -c %s "/tmp/gen/$name")" -eq "$size" ]
    set -- $(sha256sum "/tmp/gen/$name")
    echo "$name $1" >> /tmp/sums
done
cp /tmp/gen/* /data/
sync
for f in /tmp/gen/*; do cmp "$f" "/data/${{f##*/}}"; done
while read -r name sum; do echo "UBD-SUM $name $sum"; done < /tmp/sums
"#,
        specs = specs.join(" ")
    );
    uml::make_rootfs(&base, 32, &body, &[]).expect("build the base root image");
    let base_before = fingerprint(&base);

    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    let console = uml::boot_ok(
        &[format!("ubd0={},{}", path_str(&cow), path_str(&base))],
        BOOT_TIMEOUT,
    );

    let sums: BTreeMap<&str, &str> = uml::tagged_lines(&console, "UBD-SUM ")
        .into_iter()
        .map(|line| {
            line.split_once(' ')
                .unwrap_or_else(|| panic!("malformed UBD-SUM line {line:?}"))
        })
        .collect();
    let names: Vec<&str> = GUEST_FILES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        sums.keys().copied().collect::<Vec<_>>(),
        {
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted
        },
        "the guest did not report every file:\n{console}"
    );

    // The overlay UML wrote is clean by ubd's standards.
    run(ubd().arg("check").arg(&cow));
    let info = ubd_info(&cow);
    assert_eq!(info_str(&info, "format"), "cow", "{info}");
    assert_eq!(info_u64(&info, "version"), 3, "{info}");
    assert!(info_bool(&info, "backing_matches"), "{info}");
    assert!(
        info_u64(&info, "sectors_present") > 0,
        "UML wrote nothing to the overlay? {info}"
    );

    uml_moo(&cow, &merged);
    assert_eq!(
        fs::metadata(&merged).expect("stat merged image").len(),
        fs::metadata(&base).expect("stat base image").len(),
        "the merged image differs in size from the base"
    );
    // The guest remounted / read-only before powering off, so the merged
    // filesystem must be clean (no journal to replay).
    run(Command::new(tool("e2fsck", "e2fsprogs"))
        .arg("-fn")
        .arg(&merged));
    let debugfs = tool("debugfs", "e2fsprogs");
    for &(name, size) in GUEST_FILES {
        let data = run_bytes(
            Command::new(&debugfs)
                .arg("-R")
                .arg(format!("cat /data/{name}"))
                .arg(&merged),
        );
        assert_eq!(data.len(), size, "size of /data/{name} in the merged image");
        assert_eq!(
            sha256_hex(&data),
            sums[name],
            "SHA-256 of /data/{name} in the merged image differs from the guest's"
        );
    }

    // The same overlay as a qcow2 overlay over the same base: what qemu
    // reads through it is what uml_moo merged.
    let qcow2 = dir.path().join("cow.qcow2");
    run(ubd()
        .args(["convert", "-O", "qcow2", "--keep-backing"])
        .arg(&cow)
        .arg(&qcow2));
    let through_qemu = dir.path().join("through-qemu.img");
    run(Command::new(tool("qemu-img", "qemu-utils"))
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&through_qemu));
    assert!(
        fs::read(&through_qemu).unwrap() == fs::read(&merged).unwrap(),
        "qemu's read of the qcow2 overlay differs from uml_moo's merge"
    );
    assert!(
        fs::metadata(&qcow2).unwrap().len() < fs::metadata(&base).unwrap().len() / 2,
        "the qcow2 overlay copied the base"
    );

    assert_eq!(
        fingerprint(&base),
        base_before,
        "the backing image changed (content or mtime)"
    );
}

/// Test (b): size of the data disk, where the guest writes, and what.
const DATA_DISK_BYTES: u64 = 8 << 20;
const PAYLOAD_LEN: usize = 40 * 1024;
/// In 4 KiB blocks: 4 KiB-aligned, not 1 MiB-aligned.
const WRITE_BLOCK: u64 = 300;

/// Backing content for the data disk: every 512-byte sector holds its own
/// number (u32, little-endian) repeated, so any misplaced sector shows.
fn sector_pattern(bytes: u64) -> Vec<u8> {
    (0..bytes / 512)
        .flat_map(|sector| {
            let word = u32::try_from(sector).expect("small disk").to_le_bytes();
            std::iter::repeat_n(word, 128).flatten()
        })
        .collect()
}

#[test]
fn uml_writes_through_uml_mkcow_overlay_and_ubd_info_counts_it() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let root = dir.path().join("root.img");
    let data_base = dir.path().join("data_base.img");
    let cow = dir.path().join("cow2.img");
    let merged = dir.path().join("merged2.img");

    let base_data = sector_pattern(DATA_DISK_BYTES);
    fs::write(&data_base, &base_data).expect("write the data base image");
    let payload = common::pseudo_random_bytes(0x5eed_0b0d, PAYLOAD_LEN);
    let offset = usize::try_from(WRITE_BLOCK * 4096).expect("offset fits usize");
    let blocks = PAYLOAD_LEN / 4096;
    assert_eq!(PAYLOAD_LEN % 4096, 0);

    // bs=4096 gives busybox dd a page-aligned buffer, so oflag=direct really
    // bypasses the page cache (with a smaller bs it silently falls back to
    // buffered I/O) and UML sees exactly the payload's sectors. The read-back
    // with iflag=direct checks the data went through the disk.
    let body = format!(
        r#"[ "$(cat /sys/block/ubdb/size)" -eq {sectors} ]
dd if=/payload/blob of=/dev/ubdb bs=4096 seek={WRITE_BLOCK} oflag=direct conv=notrunc,fsync
want=$(sha256sum < /payload/blob)
got=$(dd if=/dev/ubdb bs=4096 skip={WRITE_BLOCK} count={blocks} iflag=direct | sha256sum)
echo "UBD-READBACK want=$want got=$got"
[ "$want" = "$got" ]
"#,
        sectors = DATA_DISK_BYTES / 512,
    );
    uml::make_rootfs(&root, 16, &body, &[("payload/blob", &payload)])
        .expect("build the root image");

    run(Command::new(tool("uml_mkcow", "uml-utilities"))
        .arg(&cow)
        .arg(&data_base));
    let base_before = fingerprint(&data_base);

    uml::boot_ok(
        &[
            format!("ubd0={}", path_str(&root)),
            format!("ubd1={},{}", path_str(&cow), path_str(&data_base)),
        ],
        BOOT_TIMEOUT,
    );

    let info = ubd_info(&cow);
    let payload_sectors = (PAYLOAD_LEN / 512) as u64;
    assert_eq!(info_str(&info, "format"), "cow", "{info}");
    assert_eq!(info_u64(&info, "version"), 3, "{info}");
    assert_eq!(
        info_str(&info, "backing_file"),
        path_str(&data_base),
        "{info}"
    );
    assert_eq!(info_u64(&info, "backing_size"), DATA_DISK_BYTES, "{info}");
    assert_eq!(info_u64(&info, "sector_size"), 512, "{info}");
    assert_eq!(
        info_u64(&info, "sectors_total"),
        DATA_DISK_BYTES / 512,
        "{info}"
    );
    assert_eq!(
        info_u64(&info, "sectors_present"),
        payload_sectors,
        "{info}"
    );
    assert!(info_bool(&info, "backing_matches"), "{info}");
    run(ubd().arg("check").arg(&cow));

    // Exactly the payload's sectors are marked in UML's bitmap (bit n of the
    // bitmap is bit n % 8 of byte n / 8), and their data sits where ubd says.
    let cow_bytes = fs::read(&cow).expect("read the overlay");
    let bitmap_offset = usize::try_from(info_u64(&info, "bitmap_offset")).expect("usize");
    let bitmap_length = usize::try_from(info_u64(&info, "bitmap_length")).expect("usize");
    let data_offset = usize::try_from(info_u64(&info, "data_offset")).expect("usize");
    let bitmap = &cow_bytes[bitmap_offset..bitmap_offset + bitmap_length];
    let marked: Vec<usize> = (0..bitmap_length * 8)
        .filter(|n| bitmap[n / 8] & (1 << (n % 8)) != 0)
        .collect();
    let first = offset / 512;
    let expected: Vec<usize> = (first..first + PAYLOAD_LEN / 512).collect();
    assert_eq!(marked, expected, "sectors marked in the overlay's bitmap");
    assert_eq!(
        &cow_bytes[data_offset + offset..data_offset + offset + PAYLOAD_LEN],
        &payload[..],
        "payload in the overlay at data_offset + sector * 512"
    );

    uml_moo(&cow, &merged);
    let merged_data = fs::read(&merged).expect("read the merged image");
    assert_eq!(merged_data.len(), base_data.len(), "merged image size");
    // `ubd convert` of the overlay UML wrote equals uml_moo's merge.
    let converted = dir.path().join("converted2.img");
    run(ubd().arg("convert").arg(&cow).arg(&converted));
    assert!(
        fs::read(&converted).expect("read the converted image") == merged_data,
        "ubd convert differs from uml_moo on an overlay UML wrote"
    );
    let end = offset + PAYLOAD_LEN;
    assert!(
        merged_data[..offset] == base_data[..offset],
        "merged image differs from the base before the written range"
    );
    assert!(
        merged_data[offset..end] == payload[..],
        "merged image does not hold the payload in the written range"
    );
    assert!(
        merged_data[end..] == base_data[end..],
        "merged image differs from the base after the written range"
    );

    assert_eq!(
        fingerprint(&data_base),
        base_before,
        "the backing image changed (content or mtime)"
    );
}

/// Test (c): where a `Device` writes, with what; some writes are partial
/// sectors at odd offsets, one crosses a 4 KiB boundary, one overlaps
/// another, one ends at the last byte of the device.
const DEVICE_WRITES: &[(u64, usize)] = &[
    (10 * 4096, 4096),
    (1000, 1),
    (12_345, 777),
    (3 * 8192 - 100, 300),
    (100 * 4096 + 511, 513),
    (10 * 4096 + 100, 50),
    (1 << 20, 65_536 + 17),
    ((5 << 20) + 3, 100_000),
    (DATA_DISK_BYTES - 300, 300),
];

#[test]
fn device_writes_boot_in_uml() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let root = dir.path().join("root.img");
    let data_base = dir.path().join("data_base.img");
    let cow = dir.path().join("cow3.img");

    let base_data = common::pseudo_random_bytes(0xdead_5ec7, DATA_DISK_BYTES as usize);
    fs::write(&data_base, &base_data).expect("write the data base image");
    ubd::image::create_overlay(&cow, &data_base, false).expect("create the overlay");
    let base_before = fingerprint(&data_base);

    let mut expected = base_data.clone();
    let dev = Device::open(&cow, &DeviceOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {}", cow.display(), ubd::error_chain(&e)));
    assert_eq!(dev.capacity(), DATA_DISK_BYTES);
    for (n, &(offset, len)) in DEVICE_WRITES.iter().enumerate() {
        let data = common::pseudo_random_bytes(0x1000 + n as u64, len);
        dev.write_at(offset, &data, Flags::default())
            .unwrap_or_else(|e| panic!("write {len} bytes at {offset}: {e}"));
        let at = usize::try_from(offset).expect("offset fits usize");
        expected[at..at + len].copy_from_slice(&data);
    }
    let mut readback = vec![0u8; expected.len()];
    dev.read_at(0, &mut readback).expect("read the device back");
    assert!(readback == expected, "the device reads back wrong");
    dev.flush().expect("flush");
    dev.close().expect("close");
    drop(dev);
    assert_eq!(
        fingerprint(&data_base),
        base_before,
        "the device changed the backing image (content or mtime)"
    );

    // Reads of one 4 KiB page each (iflag=direct, page-aligned buffer): UML
    // shifts the data of a request's later segments when an earlier segment
    // mixes overlay and backing sectors (cow-format.md), which partial-sector
    // writes produce; one segment per request avoids that UML bug.
    let body = format!(
        r#"[ "$(cat /sys/block/ubdb/size)" -eq {sectors} ]
set -- $(dd if=/dev/ubdb bs=4096 iflag=direct 2>/dev/null | sha256sum)
echo "UBD-DEVSUM $1"
"#,
        sectors = DATA_DISK_BYTES / 512,
    );
    uml::make_rootfs(&root, 16, &body, &[]).expect("build the root image");
    let console = uml::boot_ok(
        &[
            format!("ubd0={}", path_str(&root)),
            format!("ubd1={},{}", path_str(&cow), path_str(&data_base)),
        ],
        BOOT_TIMEOUT,
    );
    let sums = uml::tagged_lines(&console, "UBD-DEVSUM ");
    assert_eq!(
        sums,
        [sha256_hex(&expected).as_str()],
        "SHA-256 of /dev/ubdb in the guest vs the expected device contents:\n{console}"
    );

    run(ubd().arg("check").arg(&cow));
    // uml_moo reads the overlay the same way.
    let merged = dir.path().join("merged3.img");
    uml_moo(&cow, &merged);
    let merged_data = fs::read(&merged).expect("read the merged image");
    assert_eq!(merged_data.len(), expected.len(), "merged image size");
    if let Some(at) = merged_data.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("uml_moo's merge differs from the expected contents at byte {at}");
    }
    assert_eq!(
        fingerprint(&data_base),
        base_before,
        "the backing image changed (content or mtime)"
    );
}

/// Test (d): what the guest writes through a `uml_mkcow` overlay, in 4 KiB
/// blocks: (block, length in bytes).
const GUEST_WRITES: &[(u64, usize)] = &[(300, 40 * 1024), (1030, 8 * 1024)];

/// Runs of the device by where they read from, as (range, depth): adjacent
/// extents of one depth are joined, whatever their `zero` flags.
fn depth_runs(extents: &[Extent]) -> Vec<(std::ops::Range<u64>, u8)> {
    let mut runs: Vec<(std::ops::Range<u64>, u8)> = Vec::new();
    let mut at = 0;
    for e in extents {
        match runs.last_mut() {
            Some((range, depth)) if *depth == e.depth => range.end += e.len,
            _ => runs.push((at..at + e.len, e.depth)),
        }
        at += e.len;
    }
    runs
}

#[test]
fn uml_written_overlay_reads_through_device() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let root = dir.path().join("root.img");
    let data_base = dir.path().join("data_base.img");
    let cow = dir.path().join("cow4.img");

    let base_data = sector_pattern(DATA_DISK_BYTES);
    fs::write(&data_base, &base_data).expect("write the data base image");
    let mut expected = base_data.clone();
    let mut extra = Vec::new();
    let mut body = format!(
        "[ \"$(cat /sys/block/ubdb/size)\" -eq {} ]\n",
        DATA_DISK_BYTES / 512
    );
    for (n, &(block, len)) in GUEST_WRITES.iter().enumerate() {
        assert_eq!(len % 4096, 0);
        let payload = common::pseudo_random_bytes(0xb10b + n as u64, len);
        let at = usize::try_from(block * 4096).expect("offset fits usize");
        expected[at..at + len].copy_from_slice(&payload);
        extra.push((format!("payload/blob{n}"), payload));
        // As in test (b): bs=4096 makes busybox dd's O_DIRECT real.
        body.push_str(&format!(
            "dd if=/payload/blob{n} of=/dev/ubdb bs=4096 seek={block} oflag=direct \
             conv=notrunc,fsync\n"
        ));
    }
    let extra: Vec<(&str, &[u8])> = extra
        .iter()
        .map(|(path, data)| (path.as_str(), data.as_slice()))
        .collect();
    uml::make_rootfs(&root, 16, &body, &extra).expect("build the root image");

    run(Command::new(tool("uml_mkcow", "uml-utilities"))
        .arg(&cow)
        .arg(&data_base));
    let base_before = fingerprint(&data_base);

    uml::boot_ok(
        &[
            format!("ubd0={}", path_str(&root)),
            format!("ubd1={},{}", path_str(&cow), path_str(&data_base)),
        ],
        BOOT_TIMEOUT,
    );

    let opts = DeviceOptions {
        read_only: true,
        ..DeviceOptions::default()
    };
    let dev = Device::open(&cow, &opts)
        .unwrap_or_else(|e| panic!("open {}: {}", cow.display(), ubd::error_chain(&e)));
    assert_eq!(dev.capacity(), DATA_DISK_BYTES, "capacity");
    let mut data = vec![0u8; expected.len()];
    dev.read_at(0, &mut data)
        .unwrap_or_else(|e| panic!("read the device: {}", ubd::error_chain(&e)));
    if let Some(at) = data.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "the device reads the UML-written overlay wrong, first at byte {at} (sector {})",
            at / 512
        );
    }

    let extents = dev
        .block_status(0, DATA_DISK_BYTES)
        .unwrap_or_else(|e| panic!("block status: {}", ubd::error_chain(&e)));
    let covered: u64 = extents.iter().map(|e| e.len).sum();
    assert_eq!(covered, DATA_DISK_BYTES, "block status covers {extents:?}");
    let mut want = Vec::new();
    let mut at = 0;
    for &(block, len) in GUEST_WRITES {
        let (start, end) = (block * 4096, block * 4096 + len as u64);
        want.push((at..start, 2));
        want.push((start..end, 1));
        at = end;
    }
    want.push((at..DATA_DISK_BYTES, 2));
    assert_eq!(
        depth_runs(&extents),
        want,
        "depth 1 (overlay) exactly where the guest wrote, 2 (backing) elsewhere; \
         extents {extents:?}"
    );
    dev.close().expect("close");
    drop(dev);

    run(ubd().arg("check").arg(&cow));
    assert_eq!(
        fingerprint(&data_base),
        base_before,
        "the backing image changed (content or mtime)"
    );
}
