#!/bin/busybox sh
# The guest side of `cargo xtask guest-test`: checks the virtio-blk disk /dev/vda from inside
# a real Linux kernel and prints one `GUEST-CHECK <name> ok|FAIL ...` line per check, then
# `GUEST-RESULT PASS|FAIL`. Expectations come from the kernel command line (guest.*=).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /mnt /tmp

arg() { sed -n "s/.*guest\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
EXPECT_SECTORS=$(arg sectors)
EXPECT_LBS=$(arg lbs)
EXPECT_RO=$(arg ro)
FILECHECK=$(arg filecheck)
RESIZE=$(arg resize)
FAILED=0
check() { # name, command...
    name=$1; shift
    if out=$("$@" 2>&1); then echo "GUEST-CHECK $name ok"; else echo "GUEST-CHECK $name FAIL: $(echo "$out" | tail -3 | tr '\n' ' ')"; FAILED=1; fi
}

# The modules the kernel needs for a virtio disk, in load order (one for UML, the virtio
# core and the MMIO transport too for Debian's kernel under QEMU).
for module in $(cat /modules); do insmod "/$module"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check device test -b /dev/vda
if [ "$(arg mode)" = bench ]; then
    # `cargo xtask bench guest`: the same fio jobs against each export; one line per job.
    RUNTIME=$(arg runtime)
    bench() { # name, fio options...
        name=$1; shift
        if out=$(fio --name="$name" --filename=/dev/vda --direct=1 --ioengine=libaio \
            --runtime="$RUNTIME" --time_based --output-format=terse --terse-version=3 "$@" 2>&1); then
            # Terse v3: read IOPS and KiB/s are fields 8 and 7, write IOPS and KiB/s 49 and 48.
            echo "$out" | tail -1 | awk -F';' -v n="$name" '{ if ($8 > 0) print "GUEST-BENCH " n " iops=" $8 " kibps=" $7; else print "GUEST-BENCH " n " iops=" $49 " kibps=" $48 }'
        else
            echo "GUEST-BENCH $name FAIL: $(echo "$out" | tail -1)"
        fi
    }
    bench randread-4k-qd1 --rw=randread --bs=4k --iodepth=1
    bench randread-4k-qd32 --rw=randread --bs=4k --iodepth=32
    bench write-1m-qd4 --rw=write --bs=1M --iodepth=4
    echo "GUEST-RESULT PASS"
    poweroff -f
fi

if [ "$(arg mode)" = restart ]; then
    # The export dies (SIGKILL) and comes back while fio writes: QEMU reconnects, the new
    # export resubmits what the old one had in flight, and fio must verify every block
    # without an I/O error. The kill comes once 2 MiB are written (sectors written, field 7
    # of the disk's stat), so that it lands in the middle of the writes.
    fio --name=restart --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
        --bs=4k --iodepth=16 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --randrepeat=0 > /tmp/fio.out 2>&1 &
    FIO=$!
    i=0; while [ "$(awk '{print $7}' /sys/block/vda/stat)" -lt 4096 ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
    echo "GUEST-INFO sectors-written-before-kill=$(awk '{print $7}' /sys/block/vda/stat)"
    echo "GUEST-KILL-EXPORT"
    wait $FIO
    RC=$?
    echo "GUEST-INFO fio exit=$RC $(grep -E 'err=|verify|WRITE:|READ:' /tmp/fio.out | tr -s ' ' | tr '\n' ' ')"
    check fio-verify-across-restart test $RC = 0
    check no-io-error sh -c '! dmesg | grep -iE "I/O error|(vda|virtio_blk|virtblk).*(error|timed out|timeout|fail)"'
    dmesg | grep -iE "vda|virtio|blk" | tail -5 | sed 's/^/GUEST-INFO dmesg: /'
    if [ $FAILED = 0 ]; then echo "GUEST-RESULT PASS"; else echo "GUEST-RESULT FAIL"; fi
    poweroff -f
fi

SECTORS=$(cat /sys/block/vda/size)
LBS=$(cat /sys/block/vda/queue/logical_block_size)
RO=$(cat /sys/block/vda/ro)
echo "GUEST-INFO sectors=$SECTORS lbs=$LBS ro=$RO"
check size test "$SECTORS" = "$EXPECT_SECTORS"
check sector-size test "$LBS" = "$EXPECT_LBS"
check read-only-flag test "$RO" = "$EXPECT_RO"

if [ "$EXPECT_RO" = 1 ]; then
    check read dd if=/dev/vda of=/dev/null bs=64k count=16
    check write-refused sh -c '! dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct'
else
    # Random writes verified with crc32c on the raw device (direct I/O, queue depth 16).
    check fio-verify fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio \
        --rw=randwrite --bs=4k --iodepth=16 --size=16M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=0
    # Discard must succeed when the device offers it.
    if [ "$(cat /sys/block/vda/queue/discard_max_bytes)" != 0 ]; then
        check discard blkdiscard -o 0 -l 1048576 /dev/vda
    else
        echo "GUEST-CHECK discard skipped: the device offers no discard"
    fi
    check mkfs mkfs.ext4 -q -F /dev/vda
    check fsck-fresh e2fsck -fn /dev/vda
    check mount mount -t ext4 /dev/vda /mnt
    dd if=/dev/urandom of=/tmp/data bs=64k count=64 2>/dev/null
    SUM=$(md5sum /tmp/data | cut -d' ' -f1)
    check fs-write cp /tmp/data /mnt/data
    check sync sync
    check umount umount /mnt
    echo 3 > /proc/sys/vm/drop_caches
    check remount mount -t ext4 /dev/vda /mnt
    check fs-roundtrip sh -c "test \"\$(md5sum /mnt/data | cut -d' ' -f1)\" = $SUM"
    umount /mnt
    check fsck-after e2fsck -fn /dev/vda
    if [ "$FILECHECK" = 1 ]; then
        # A pattern written with direct I/O and flushed (conv=fsync) must be in the backing
        # file at the same offset: the host compares while the export still runs.
        dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
        check flush-write dd if=/tmp/pattern of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync
        echo "GUEST-FILE-CHECK offset=8388608 len=1048576 md5=$(md5sum /tmp/pattern | cut -d' ' -f1)"
    fi
fi

if [ -n "$RESIZE" ]; then
    # The host grows the disk when it reads this line; the new size must reach the driver
    # (a configuration-change notification) without any action in here.
    echo "GUEST-RESIZE-READY"
    i=0; while [ "$(cat /sys/block/vda/size)" != "$RESIZE" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
    check resize test "$(cat /sys/block/vda/size)" = "$RESIZE"
    check resize-read-end dd if=/dev/vda of=/dev/null bs=512 skip=$((RESIZE - 1)) count=1
fi

if [ $FAILED = 0 ]; then echo "GUEST-RESULT PASS"; else echo "GUEST-RESULT FAIL"; fi
poweroff -f
