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
FAILED=0
check() { # name, command...
    name=$1; shift
    if out=$("$@" 2>&1); then echo "GUEST-CHECK $name ok"; else echo "GUEST-CHECK $name FAIL: $(echo "$out" | tail -3 | tr '\n' ' ')"; FAILED=1; fi
}

insmod /virtio_blk.ko
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check device test -b /dev/vda
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
fi

if [ $FAILED = 0 ]; then echo "GUEST-RESULT PASS"; else echo "GUEST-RESULT FAIL"; fi
poweroff -f
