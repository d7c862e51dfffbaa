import Glibc
import HVSCSIDisk
import HVSys

/// What `hvctl disk info` shows of an image: its format, sizes and backing chain.
public struct DiskInfo: Codable, Equatable, Sendable {
    public struct Backing: Codable, Equatable, Sendable {
        public var path: String
        public var format: String
    }

    public var path: String
    /// "raw" or "qcow2".
    public var format: String
    /// The size the guest sees.
    public var virtualSize: UInt64
    /// The file's length.
    public var fileSize: UInt64
    /// Bytes of host storage the file occupies (a sparse or thin image: less than its size).
    public var allocated: UInt64
    /// qcow2: its cluster size.
    public var clusterSize: UInt64?
    /// qcow2: its backing chain, nearest first.
    public var backing: [Backing]

    enum CodingKeys: String, CodingKey {
        case path, format, backing
        case virtualSize = "virtual_size", fileSize = "file_size", allocated, clusterSize = "cluster_size"
    }

    /// Reads `path` without writing or locking it (an image a VM is writing can be inspected).
    public static func inspect(_ path: String) throws(UsageError) -> DiskInfo {
        let file: FileDescriptor
        do { file = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular) } catch {
            throw UsageError(message: "cannot open disk image '\(path)': \(error)")
        }
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw UsageError(message: "cannot stat disk image '\(path)': \(Errno.current)") }
        var info = DiskInfo(path: absolutePath(path), format: "raw", virtualSize: UInt64(st.st_size), fileSize: UInt64(st.st_size),
                            allocated: UInt64(st.st_blocks) * 512, clusterSize: nil, backing: [])
        let detected = ImageFormat.detect(file) ?? .raw
        switch detected {
        case .raw: return info
        case .qcow2: break
        default: throw UsageError(message: "disk image '\(path)' is a \(detected.name) image; hv reads raw and qcow2 images")
        }
        let qcow: QCOW2ImageInfo
        do { qcow = try QCOW2ImageInfo.read(file.rawValue, readOnly: true) } catch {
            throw UsageError(message: "disk image '\(path)': \(error)")
        }
        info.format = "qcow2"
        info.virtualSize = qcow.header.size
        info.clusterSize = qcow.header.clusterSize
        let chain = try openBackingChain(of: path, qcow, seen: [(UInt64(st.st_dev), UInt64(st.st_ino))], lock: false)
        info.backing = chain.map { Backing(path: absolutePath($0.path), format: $0.format.rawValue) }
        return info
    }
}

/// Growing an image no VM holds (`hvctl disk resize`).
public enum DiskResize {
    /// Grows the raw or qcow2 image at `path` to `size` bytes (whole 512-byte sectors); the
    /// guest sees the new space as zeros. Refuses an image in use (locked) and any shrink.
    public static func grow(_ path: String, to size: UInt64) throws(UsageError) -> DiskInfo {
        try grow(path, to: size, locked: nil)
    }

    /// `locked`: the image, already open read-write and locked by the caller.
    static func grow(_ path: String, to size: UInt64, locked: FileDescriptor?) throws(UsageError) -> DiskInfo {
        let file: FileDescriptor
        if let locked {
            file = locked
        } else {
            do { file = try FileDescriptor.openHostFile(path, flags: O_RDWR, kinds: .regular) } catch {
                throw UsageError(message: "cannot open disk image '\(path)' for writing: \(error)")
            }
            guard lockImage(file, exclusive: true) else {
                throw UsageError(message: "disk image '\(path)' is in use (a running VM, or QEMU); stop it first")
            }
        }
        guard size % 512 == 0 else { throw UsageError(message: "\(size) is not a multiple of 512 bytes (a disk is whole sectors)") }
        let format = ImageFormat.detect(file) ?? .raw
        switch format {
        case .raw:
            let current = (try? file.size()) ?? 0
            guard Int64(clamping: size) > current else {
                throw UsageError(message: "disk image '\(path)' is already \(current) bytes; hv only grows images")
            }
            guard ftruncate(file.rawValue, off_t(clamping: size)) == 0 else {
                throw UsageError(message: "cannot grow '\(path)': \(Errno.current)")
            }
        case .qcow2:
            do { try QCOW2Backend.grow(fd: file.rawValue, to: size) } catch {
                throw UsageError(message: "disk image '\(path)': \(error)")
            }
        default:
            throw UsageError(message: "disk image '\(path)' is a \(format.name) image; hv reads raw and qcow2 images")
        }
        return try DiskInfo.inspect(path)
    }
}

/// Copying an image, its backing chain flattened, into a new raw or qcow2 image
/// (`hvctl disk convert`). Zero ranges are skipped, so the copy is sparse (raw) or thin (qcow2).
public enum DiskConvert {
    /// Bytes copied per step (and per progress report).
    static let chunk = 1 << 20

    /// Converts `source` (raw or qcow2, with its chain) to a new `format` image at `destination`;
    /// `progress(done, total)` is called after each step, and the conversion stops (failing)
    /// at the first step `cancelled` says so. The source and its chain are share-locked (nobody
    /// may write them meanwhile); the destination never overwrites a file and is removed if the
    /// conversion fails or is cancelled.
    public static func convert(_ source: String, to destination: String, format: VMDefinition.DiskFormat,
                               cancelled: () -> Bool = { false }, progress: (UInt64, UInt64) -> Void) throws(UsageError) {
        let file: FileDescriptor
        do { file = try FileDescriptor.openHostFile(source, flags: O_RDONLY, kinds: .regular) } catch {
            throw UsageError(message: "cannot open disk image '\(source)': \(error)")
        }
        guard lockImage(file, exclusive: false) else {
            throw UsageError(message: "disk image '\(source)' is being written (a running VM, or QEMU); stop it first")
        }
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw UsageError(message: "cannot stat disk image '\(source)': \(Errno.current)") }
        let input: any BlockBackend
        var chain: [BackingImage] = []
        switch ImageFormat.detect(file) ?? .raw {
        case .raw:
            input = FileBackend(fd: file.rawValue, byteCount: UInt64(st.st_size))
        case .qcow2:
            do {
                let info = try QCOW2ImageInfo.read(file.rawValue, readOnly: true)
                chain = try openBackingChain(of: source, info, seen: [(UInt64(st.st_dev), UInt64(st.st_ino))])
                input = try QCOW2Backend.chain(top: file.rawValue, readOnly: true,
                                               backing: chain.map { ($0.file.rawValue, $0.format == .qcow2) })
            } catch let error as UsageError {
                throw error
            } catch {
                throw UsageError(message: "disk image '\(source)': \(error)")
            }
        case let other:
            throw UsageError(message: "disk image '\(source)' is a \(other.name) image; hv reads raw and qcow2 images")
        }
        let size = input.byteCount
        let output: any BlockBackend
        let fd = try createNewImage(destination)
        var finished = false
        defer {
            close(fd)
            if !finished { unlink(destination) }
        }
        switch format {
        case .raw:
            guard ftruncate(fd, off_t(clamping: size)) == 0 else { throw UsageError(message: "cannot size '\(destination)': \(Errno.current)") }
            output = FileBackend(fd: fd, byteCount: size)
        case .qcow2:
            do {
                let bytes = try QCOW2Header.newImage(size: size)
                guard bytes.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, 0) }) == bytes.count else {
                    throw UsageError(message: "cannot write '\(destination)': \(Errno.current)")
                }
                output = try QCOW2Backend(fd: fd, readOnly: false)
            } catch let error as UsageError {
                throw error
            } catch {
                throw UsageError(message: "cannot make '\(destination)': \(error)")
            }
        }
        var buffer = [UInt8](repeating: 0, count: chunk)
        var done: UInt64 = 0
        while done < size {
            if cancelled() { throw UsageError(message: "the conversion of '\(source)' was cancelled; '\(destination)' is removed") }
            let n = Int(min(UInt64(chunk), size - done))
            let read = buffer.withUnsafeMutableBytes { input.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: done) }
            if let read { throw UsageError(message: "cannot read '\(source)' at byte \(done): \(Errno(rawValue: read))") }
            // All zeros stay a hole (raw) or unallocated (qcow2).
            if buffer[0..<n].contains(where: { $0 != 0 }) {
                if let e = buffer.withUnsafeBytes({ output.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: done) }) {
                    throw UsageError(message: "cannot write '\(destination)' at byte \(done): \(Errno(rawValue: e))")
                }
            }
            done += UInt64(n)
            progress(done, size)
        }
        if let e = output.flush() { throw UsageError(message: "cannot flush '\(destination)': \(Errno(rawValue: e))") }
        withExtendedLifetime(chain) {}
        finished = true
    }
}

/// Folding a qcow2 overlay into its backing image (`hvctl disk commit`).
public enum DiskCommit {
    /// Writes every cluster `overlay` holds into its backing image (grown first if smaller),
    /// flushes it, then empties the overlay (a fresh image on the same backing file, renamed over
    /// it) so it reads exactly what it did. Both images are locked exclusively: no VM may hold either.
    /// Returns the backing image's path.
    @discardableResult
    public static func commit(_ overlay: String, progress: (UInt64, UInt64) -> Void) throws(UsageError) -> String {
        let top: FileDescriptor
        do { top = try FileDescriptor.openHostFile(overlay, flags: O_RDWR, kinds: .regular) } catch {
            throw UsageError(message: "cannot open disk image '\(overlay)' for writing: \(error)")
        }
        guard lockImage(top, exclusive: true) else {
            throw UsageError(message: "disk image '\(overlay)' is in use (a running VM, or QEMU); stop it first")
        }
        guard ImageFormat.detect(top) == .qcow2 else { throw UsageError(message: "disk image '\(overlay)' is not a qcow2 overlay") }
        let info: QCOW2ImageInfo
        do { info = try QCOW2ImageInfo.read(top.rawValue, readOnly: true) } catch {
            throw UsageError(message: "disk image '\(overlay)': \(error)")
        }
        guard let name = info.backingName else { throw UsageError(message: "disk image '\(overlay)' has no backing file to commit into") }
        let basePath = backingPath(name, of: overlay)
        let baseFile: FileDescriptor
        do { baseFile = try FileDescriptor.openHostFile(basePath, flags: O_RDWR, kinds: .regular) } catch {
            throw UsageError(message: "cannot open backing file '\(basePath)' for writing: \(error)")
        }
        guard lockImage(baseFile, exclusive: true) else {
            throw UsageError(message: "backing file '\(basePath)' is in use (another overlay's VM, or QEMU); stop it first")
        }
        let baseFormat = ImageFormat.detect(baseFile) ?? .raw
        guard baseFormat == .raw || baseFormat == .qcow2 else {
            throw UsageError(message: "backing file '\(basePath)' is a \(baseFormat.name) image; hv writes raw and qcow2 images")
        }
        // The base grows to the overlay's size first, as qemu-img commit does.
        let baseSize: UInt64
        if baseFormat == .qcow2 {
            do { baseSize = try QCOW2ImageInfo.read(baseFile.rawValue, readOnly: false).header.size } catch {
                throw UsageError(message: "backing file '\(basePath)': \(error)")
            }
        } else {
            baseSize = UInt64((try? baseFile.size()) ?? 0)
        }
        if baseSize < info.header.size { _ = try DiskResize.grow(basePath, to: info.header.size, locked: baseFile) }
        do {
            let base: any BlockBackend = baseFormat == .raw
                ? FileBackend(fd: baseFile.rawValue, byteCount: info.header.size)
                : try QCOW2Backend(fd: baseFile.rawValue, readOnly: false)
            let image = try QCOW2Backend(fd: top.rawValue, readOnly: true, backing: base)
            let cluster = info.header.clusterSize
            var buffer = [UInt8](repeating: 0, count: Int(cluster))
            var at: UInt64 = 0
            while at < info.header.size {
                let n = Int(min(cluster, info.header.size - at))
                if image.holdsCluster(at: at) {
                    if let e = buffer.withUnsafeMutableBytes({ image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: at) }) {
                        throw UsageError(message: "cannot read '\(overlay)' at byte \(at): \(Errno(rawValue: e))")
                    }
                    if let e = buffer.withUnsafeBytes({ base.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at) }) {
                        throw UsageError(message: "cannot write '\(basePath)' at byte \(at): \(Errno(rawValue: e))")
                    }
                }
                at += UInt64(n)
                progress(at, info.header.size)
            }
            if let e = base.flush() { throw UsageError(message: "cannot flush '\(basePath)': \(Errno(rawValue: e))") }
        } catch let error as UsageError {
            throw error
        } catch {
            throw UsageError(message: "cannot commit '\(overlay)': \(error)")
        }
        // The overlay, emptied: a fresh image on the same backing file, put in place in one rename.
        let fresh = overlay + ".hv-commit"
        unlink(fresh)
        _ = try QCOW2Disk.create(fresh, size: info.header.size, backing: name, backingFormat: baseFormat.name)
        guard rename(fresh, overlay) == 0 else {
            let e = Errno.current
            unlink(fresh)
            throw UsageError(message: "committed into '\(basePath)', but cannot empty '\(overlay)': \(e)")
        }
        return basePath
    }
}

/// Making qcow2 images (`hvctl disk create --format qcow2`).
public enum QCOW2Disk {
    /// Creates a thin qcow2 image of `size` bytes at `path` (nil: the backing image's size), on
    /// `backing` if given: its name is stored as given (relative to the new image's directory,
    /// as qemu-img resolves it) with its format. An existing file is never touched (O_EXCL).
    /// Returns the virtual size.
    @discardableResult
    public static func create(_ path: String, size: UInt64?, backing: String?, backingFormat known: String? = nil) throws(UsageError) -> UInt64 {
        var virtualSize = size
        var backingFormat = known
        if let backing, known == nil || size == nil {
            let below = try DiskInfo.inspect(backingPath(backing, of: path))
            backingFormat = below.format
            virtualSize = virtualSize ?? below.virtualSize
        }
        guard let virtualSize else { throw UsageError(message: "--size is needed without --backing") }
        let bytes: [UInt8]
        do { bytes = try QCOW2Header.newImage(size: virtualSize, backingName: backing, backingFormat: backingFormat) } catch {
            throw UsageError(message: "cannot make '\(path)': \(error)")
        }
        let fd = try createNewImage(path)
        defer { close(fd) }
        let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        guard written == bytes.count, fsync(fd) == 0 else {
            let e = errno
            unlink(path)
            throw UsageError(message: "cannot write '\(path)': \(String(cString: strerror(e)))")
        }
        return virtualSize
    }
}
