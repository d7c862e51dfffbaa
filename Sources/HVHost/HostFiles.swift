import Glibc
import HVBIOSContract
import HVCore
import HVIPC
import HVSCSIContract
import HVSCSIDisk
import HVSys
import Synchronization

/// The host files that stay open across reboots: the guest image, the initrd, the firmware.
struct BootFiles {
    var image: FileDescriptor
    var initrd: FileDescriptor?
    var firmwareSize: Int?
    var mode: BIOSContract.BootMode
}

/// Opens an input file the operator named, for reading: never blocks (a FIFO is refused, not
/// waited on), must be a regular file, and at most `maximumSize` when given; with `beneath`
/// (a confined VM's directory) it must resolve inside that directory. One line on failure.
func openInput(_ path: String, what: String, maximumSize: Int64? = nil, beneath: String? = nil) throws(UsageError) -> FileDescriptor {
    do { return try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: maximumSize, beneath: beneath) } catch {
        throw UsageError(message: "cannot open \(what) '\(path)': \(error)")
    }
}

/// The largest guest image, kernel or initrd hv loads (the BIOS device's own limit).
let maximumImageBytes: Int64 = 1 << 30

func openBootFiles(_ boot: VMDefinition.Boot, beneath: String? = nil) throws(UsageError) -> BootFiles {
    if let path = boot.firmware {
        // The system's SeaBIOS is not the VM's file: a confined VM may boot it too.
        let image = try openInput(path, what: "firmware image", beneath: path == VMDefinition.Boot.systemSeaBIOS ? nil : beneath)
        let size = (try? image.size()) ?? 0
        guard size >= 65536, size <= 16 << 20, size % 65536 == 0 else {
            throw UsageError(message: "firmware image '\(path)' is \(size) bytes: a BIOS image is a multiple of 64 KiB, at most 16 MiB (install Debian's 'seabios' package for --firmware seabios)")
        }
        return BootFiles(image: image, firmwareSize: Int(size), mode: .firmware)
    } else if let path = boot.kernel {
        let image = try openInput(path, what: "kernel", maximumSize: maximumImageBytes, beneath: beneath)
        if (try? image.size()) == 0 { throw UsageError(message: "kernel '\(path)' is empty: give a bzImage") }
        var initrd: FileDescriptor?
        if let initrdPath = boot.initrd { initrd = try openInput(initrdPath, what: "initrd", maximumSize: maximumImageBytes, beneath: beneath) }
        return BootFiles(image: image, initrd: initrd, mode: .linux)
    } else if let path = boot.multiboot {
        let image = try openInput(path, what: "guest image", maximumSize: maximumImageBytes, beneath: beneath)
        if (try? image.size()) == 0 { throw UsageError(message: "guest image '\(path)' is empty") }
        return BootFiles(image: image, mode: .multiboot)
    } else {
        do {
            let image = try MemFD.create(name: "hv-demo-guest", size: DemoGuest.image().count)
            try image.writeAll(DemoGuest.image())
            return BootFiles(image: image, mode: .multiboot)
        } catch {
            throw UsageError(message: "cannot prepare the demo guest: \(error)")
        }
    }
}

/// A disk image the trusted side opened, locked and checked.
/// Locks an image against other writers (`exclusive`) or against any writer: both the flock hv
/// has always taken and an OFD byte-range lock over the whole file, which QEMU's image locking
/// also sees. False when another process holds a conflicting lock.
func lockImage(_ file: FileDescriptor, exclusive: Bool) -> Bool {
    flock(file.rawValue, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0 && file.tryLockWholeFile(exclusive: exclusive)
}

/// Drops both of `lockImage`'s locks (a migrating VM hands its disks to the destination).
func unlockImage(_ file: FileDescriptor) {
    file.unlockWholeFile()
    flock(file.rawValue, LOCK_UN)
}

struct DiskImage {
    var path: String
    var file: FileDescriptor
    var readOnly: Bool
    var format: VMDefinition.DiskFormat = .raw
    /// A qcow2 image's backing chain, nearest first, each opened read-only and share-locked.
    var backing: [BackingImage] = []
}

/// An image below a qcow2 disk in its backing chain.
struct BackingImage {
    var path: String
    var file: FileDescriptor
    var format: VMDefinition.DiskFormat
}

/// Opens an ISO read-only with a shared lock (several VMs may share an ISO; nobody may write it),
/// for --cdrom and for `hvctl cdrom insert`; the error is one line naming the image. The file must
/// be a regular file holding an ISO 9660 or UDF volume (checked from its content), and the open
/// never blocks: the control socket's thread runs this for `cdrom insert`.
func openISO(_ path: String, what: String, beneath: String? = nil) -> Result<FileDescriptor, UsageError> {
    let file: FileDescriptor
    do { file = try openInput(path, what: what, beneath: beneath) } catch { return .failure(error) }
    if let problem = ISOImage.problem(file) {
        return .failure(UsageError(message: "\(what) '\(path)' is not a CD image: \(problem)"))
    }
    guard lockImage(file, exclusive: false) else {
        return .failure(UsageError(message: "\(what) '\(path)' is locked for writing by another process"))
    }
    return .success(file)
}

/// Recognises a CD image by content: an ISO 9660 volume descriptor ("CD001") or UDF's volume
/// recognition sequence ("BEA01", "NSR02", "NSR03") in the 2048-byte sectors from 16 on (ECMA-119
/// §8, ECMA-167 2/8.3).
enum ISOImage {
    static let sectorSize: Int64 = 2048
    static let firstDescriptorSector: Int64 = 16

    /// Why `file` is not a CD image, or nil when it is one.
    static func problem(_ file: FileDescriptor) -> String? {
        let size = (try? file.size()) ?? 0
        guard size >= (firstDescriptorSector + 1) * sectorSize else {
            return "it is \(size) bytes, too small to hold an ISO 9660 or UDF volume (at least \((firstDescriptorSector + 1) * sectorSize))"
        }
        let identifiers: [[UInt8]] = ["CD001", "BEA01", "NSR02", "NSR03"].map { Array($0.utf8) }
        var header = [UInt8](repeating: 0, count: 6)
        for sector in firstDescriptorSector..<min(firstDescriptorSector + 16, size / sectorSize) {
            let n = header.withUnsafeMutableBytes { (try? file.read(into: $0, at: sector * sectorSize)) ?? 0 }
            guard n == header.count else { break }
            if identifiers.contains(Array(header[1...5])) { return nil }
        }
        if let format = ImageFormat.detect(file), format != .raw {
            return "it is a \(format.name) disk image"
        }
        return "no ISO 9660 or UDF volume descriptor at sector 16 (make one with xorriso or genisoimage)"
    }
}

func openCDROM(_ definition: VMDefinition) throws(UsageError) -> FileDescriptor? {
    guard let path = definition.cdrom else { return nil }
    return try openISO(path, what: "the --cdrom image", beneath: definition.confinement).get()
}

/// Opens every --disk: a missing, unreadable, locked or empty image, one that is not whole
/// sectors, or the same file given twice is a one-line error before the VM starts. Each image is
/// locked unless `lock` is false (a migration's destination opens them while the source still
/// holds them, and takes the locks with `lockDisks` at the switch-over).
func openDisks(_ definition: VMDefinition, lock: Bool = true) throws(UsageError) -> [DiskImage] {
    var disks: [DiskImage] = []
    var seen: [(dev: UInt64, ino: UInt64, path: String)] = []
    for disk in definition.disks {
        let path = disk.path, readOnly = disk.readonly
        let file: FileDescriptor
        do { file = try FileDescriptor.openHostFile(path, flags: readOnly ? O_RDONLY : O_RDWR, kinds: .regular, beneath: definition.confinement) } catch {
            let denied = error.errno == .permissionDenied || error.errno?.rawValue == EROFS
            let hint = !readOnly && denied ? " (add ,readonly for a read-only disk)" : ""
            throw UsageError(message: "cannot open disk image '\(path)'\(readOnly ? "" : " for writing"): \(error)\(hint)")
        }
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw UsageError(message: "cannot stat disk image '\(path)': \(Errno.current)") }
        if let other = seen.first(where: { $0.dev == UInt64(st.st_dev) && $0.ino == UInt64(st.st_ino) }) {
            throw UsageError(message: "disk image '\(path)' is given twice (also as '\(other.path)'): one process per image")
        }
        seen.append((UInt64(st.st_dev), UInt64(st.st_ino), path))
        // A VMDK (or VHD, …) image used as raw would be corrupted by the guest's writes.
        let detected = ImageFormat.detect(file) ?? .raw
        let format: VMDefinition.DiskFormat
        switch (disk.format, detected) {
        case (.raw?, _), (nil, .raw): format = .raw
        case (.qcow2?, .qcow2), (nil, .qcow2): format = .qcow2
        case (.qcow2?, _): throw UsageError(message: "disk image '\(path)' is not a qcow2 image (it looks like \(detected.name))")
        case (nil, _):
            throw UsageError(message: "disk image '\(path)' is a \(detected.name) image; hv reads raw and qcow2 images (convert it: qemu-img convert -O qcow2 '\(path)' disk.qcow2)")
        }
        if format == .raw {
            guard st.st_size > 0, st.st_size % 512 == 0 else {
                throw UsageError(message: "disk image '\(path)' is \(st.st_size) bytes: a disk is a non-zero whole number of 512-byte sectors (make one with 'hvctl disk create')")
            }
        }
        // Another VM (or tool) writing the same image would corrupt it: take a lock, shared for
        // read-only use, exclusive for writing; both the flock hv always took and an OFD byte-range
        // lock over the whole file, which QEMU's image locking also sees.
        guard !lock || lockImage(file, exclusive: !readOnly) else {
            throw UsageError(message: "disk image '\(path)' is locked by another process (another VM using it?); stop that first")
        }
        var image = DiskImage(path: path, file: file, readOnly: readOnly, format: format)
        if format == .qcow2 {
            let info: QCOW2ImageInfo
            do { info = try QCOW2ImageInfo.read(file.rawValue, readOnly: readOnly) } catch {
                throw UsageError(message: "disk image '\(path)': \(error)")
            }
            image.backing = try openBackingChain(of: path, info, seen: seen.map { ($0.dev, $0.ino) }, beneath: definition.confinement)
        }
        disks.append(image)
    }
    return disks
}

/// Takes the image locks `openDisks(_:lock: false)` left out; nil when every one is held, else
/// why not.
func lockDisks(_ disks: [DiskImage]) -> String? {
    for disk in disks where !lockImage(disk.file, exclusive: !disk.readOnly) {
        return "disk image '\(disk.path)' is still locked by another process on this host; the source may not have let go of it"
    }
    return nil
}

/// Where a backing file named `name` in the image at `image` is: an absolute name as it is, a
/// relative one from the image's directory (as qemu-img resolves it).
func backingPath(_ name: String, of image: String) -> String {
    guard name.utf8.first != UInt8(ascii: "/"), let slash = image.lastIndex(of: "/") else { return name }
    return String(image[...slash]) + name
}

/// Opens the images below a qcow2 image, nearest first: read-only, share-locked (several overlays
/// may share a base; nobody may write it meanwhile), each name resolved the way qemu-img does
/// (relative to the directory of the image that names it). Refuses cycles, chains deeper than
/// `SCSIContract.maximumBackingDepth` and formats hv does not read, each in one line. `lock`
/// false only inspects (`hvctl disk info`): nothing is locked.
func openBackingChain(of path: String, _ top: QCOW2ImageInfo, seen: [(UInt64, UInt64)], lock: Bool = true,
                      beneath: String? = nil) throws(UsageError) -> [BackingImage] {
    var chain: [BackingImage] = []
    var seen = seen
    var current = (path: path, info: top)
    while let name = current.info.backingName {
        guard chain.count < SCSIContract.maximumBackingDepth else {
            throw UsageError(message: "disk image '\(path)' has a backing chain deeper than \(SCSIContract.maximumBackingDepth) images")
        }
        let backingPath = backingPath(name, of: current.path)
        let what = "backing file '\(backingPath)' of '\(current.path)'"
        let file: FileDescriptor
        do { file = try FileDescriptor.openHostFile(backingPath, flags: O_RDONLY, kinds: .regular, beneath: beneath) } catch {
            throw UsageError(message: "cannot open \(what): \(error)")
        }
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw UsageError(message: "cannot stat \(what): \(Errno.current)") }
        guard !seen.contains(where: { $0.0 == UInt64(st.st_dev) && $0.1 == UInt64(st.st_ino) }) else {
            throw UsageError(message: "\(what) is already in its own chain: the backing chain of '\(path)' loops")
        }
        seen.append((UInt64(st.st_dev), UInt64(st.st_ino)))
        guard !lock || lockImage(file, exclusive: false) else {
            throw UsageError(message: "\(what) is locked by a process writing it; stop that first")
        }
        let detected = ImageFormat.detect(file) ?? .raw
        let format: VMDefinition.DiskFormat
        switch current.info.backingFormat ?? detected.name {
        case "raw": format = .raw
        case "qcow2": format = .qcow2
        case let other: throw UsageError(message: "\(what) is a \(other) image; hv reads raw and qcow2 images")
        }
        chain.append(BackingImage(path: backingPath, file: file, format: format))
        guard format == .qcow2 else { break }
        do { current = (backingPath, try QCOW2ImageInfo.read(file.rawValue, readOnly: true)) } catch {
            throw UsageError(message: "\(what): \(error)")
        }
    }
    return chain
}

/// An output file the operator named (--serial file:, --debugcon file:): opened for writing
/// without truncating, so a refused start (a name already taken, a file in use) destroys
/// nothing; locked so that two VMs never write one file; truncated only by `truncate()`, once
/// every check of the start-up has passed.
struct OutputFile {
    var path: String
    var file: FileDescriptor
    var isRegular: Bool

    static func open(_ path: String, what: String) throws(UsageError) -> OutputFile {
        let file: FileDescriptor
        do {
            file = try FileDescriptor.openHostFile(path, flags: O_WRONLY | O_CREAT | O_APPEND, kinds: [.regular, .characterDevice])
        } catch {
            throw UsageError(message: "cannot open \(what) '\(path)': \(error)")
        }
        var st = stat()
        let isRegular = fstat(file.rawValue, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
        if isRegular && !file.tryLockWholeFile(exclusive: true) {
            throw UsageError(message: "\(what) '\(path)' is in use (another VM writes its console there, or this VM names it twice); give another file")
        }
        return OutputFile(path: path, file: file, isRegular: isRegular)
    }

    /// Empties the file; a console starts afresh for every run.
    func truncate() {
        if isRegular { _ = ftruncate(file.rawValue, 0) }
    }
}


/// Disk image formats hv recognises by their content, to refuse the ones it does not read instead
/// of handing a guest the raw bytes of, say, a qcow2 file (whose metadata its writes would destroy).
public enum ImageFormat: Equatable, Sendable {
    case raw, qcow2, qcow, vmdk, vhd, vhdx, vdi, qed

    /// The name `qemu-img info` uses.
    public var name: String {
        switch self {
        case .raw: "raw"
        case .qcow2: "qcow2"
        case .qcow: "qcow (version 1)"
        case .vmdk: "VMDK"
        case .vhd: "VHD (vpc)"
        case .vhdx: "VHDX"
        case .vdi: "VDI"
        case .qed: "QED"
        }
    }

    /// The format of `header` (the file's first 512 bytes or fewer) and `footer` (its last 512).
    public static func detect(header: [UInt8], footer: [UInt8]) -> ImageFormat {
        func has(_ magic: [UInt8], at offset: Int, in bytes: [UInt8]) -> Bool {
            bytes.count >= offset + magic.count && Array(bytes[offset..<offset + magic.count]) == magic
        }
        // qcow/qcow2: "QFI\xfb" then a big-endian version (1, or 2/3).
        if has([0x51, 0x46, 0x49, 0xFB], at: 0, in: header) {
            return header.count >= 8 && header[7] == 1 && header[4...6] == [0, 0, 0] ? .qcow : .qcow2
        }
        if has(Array("QED".utf8) + [0], at: 0, in: header) { return .qed }
        // VMDK: a sparse extent ("KDMV"), or a text descriptor.
        if has(Array("KDMV".utf8), at: 0, in: header) || has(Array("COWD".utf8), at: 0, in: header)
            || has(Array("# Disk DescriptorFile".utf8), at: 0, in: header) { return .vmdk }
        if has(Array("vhdxfile".utf8), at: 0, in: header) { return .vhdx }
        // VHD: "conectix" in the footer (fixed) and its copy at the start (dynamic).
        if has(Array("conectix".utf8), at: 0, in: header) || (footer.count == 512 && has(Array("conectix".utf8), at: 0, in: footer)) {
            return .vhd
        }
        // VDI: the signature 0xbeda107f (little-endian) at offset 64.
        if has([0x7F, 0x10, 0xDA, 0xBE], at: 64, in: header) { return .vdi }
        return .raw
    }

    /// The format of `file`, or nil when it cannot be read.
    public static func detect(_ file: FileDescriptor) -> ImageFormat? {
        guard let size = try? file.size() else { return nil }
        var header = [UInt8](repeating: 0, count: Int(min(size, 512)))
        let n = header.withUnsafeMutableBytes { (try? file.read(into: $0, at: 0)) ?? -1 }
        guard n == header.count else { return nil }
        var footer: [UInt8] = []
        if size >= 1024 {
            footer = [UInt8](repeating: 0, count: 512)
            let m = footer.withUnsafeMutableBytes { (try? file.read(into: $0, at: size - 512)) ?? -1 }
            if m != 512 { footer = [] }
        }
        return detect(header: header, footer: footer)
    }
}
