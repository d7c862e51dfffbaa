// hv-fuzz: runs one of hv's fuzz targets (Fuzz/Targets).
//
// Built as usual it replays inputs: `hv-fuzz TARGET FILE|DIR…` runs every file once and says how
// many it ran (the regression run CI makes over the corpora and reproducers). Built by
// `bench/fuzz` (`-D HV_LIBFUZZER`, sanitizer coverage, libFuzzer linked in), the same command line
// hands everything after TARGET to libFuzzer: `hv-fuzz TARGET [libFuzzer flags] CORPUS…`.
import Glibc
import HVFuzzTargets

/// Writes `text` to standard error.
func printError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = write(2, &bytes, bytes.count)
}

func usage() -> Never {
    var text = "usage: hv-fuzz TARGET [FILE|DIR…]   (hv-fuzz list: the targets)\n"
    for target in FuzzTargets.all { text += "  \(target.name.padding(18))\(target.covers)\n" }
    printError(text)
    exit(2)
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self + " " : self + String(repeating: " ", count: width - count) }
}

let arguments = CommandLine.arguments
guard arguments.count >= 2 else { usage() }
if arguments[1] == "list" {
    for target in FuzzTargets.all { print(target.name) }
    exit(0)
}
guard let target = FuzzTargets.named(arguments[1]) else {
    printError("hv-fuzz: no target named '\(arguments[1])': run 'hv-fuzz list' for the names\n")
    exit(2)
}

#if HV_LIBFUZZER
nonisolated(unsafe) var selected: FuzzTarget? = target

typealias TestOneInput = @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: TestOneInput) -> Int32

// libFuzzer sees the program name and everything after TARGET.
var driverArguments: [UnsafeMutablePointer<CChar>?] = [CommandLine.unsafeArgv[0]] + (2..<Int(CommandLine.argc)).map { CommandLine.unsafeArgv[$0] } + [nil]
var driverCount = Int32(driverArguments.count - 1)
let status = driverArguments.withUnsafeMutableBufferPointer { buffer in
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = buffer.baseAddress
    return LLVMFuzzerRunDriver(&driverCount, &argv) { data, count in
        selected!.run(UnsafeRawBufferPointer(start: data, count: count))
        return 0
    }
}
exit(status)
#else
/// Every regular file under `path` (itself, if it is one), sorted.
func files(under path: String) -> [String] {
    var st = stat()
    guard stat(path, &st) == 0 else {
        printError("hv-fuzz: cannot read \(path): \(String(cString: strerror(errno)))\n")
        exit(1)
    }
    guard st.st_mode & S_IFMT == S_IFDIR else { return [path] }
    guard let dir = opendir(path) else { return [] }
    defer { closedir(dir) }
    var found: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name.hasPrefix(".") { continue }
        found += files(under: path + "/" + name)
    }
    return found.sorted()
}

func contents(of path: String) -> [UInt8] {
    guard let file = fopen(path, "rb") else {
        printError("hv-fuzz: cannot open \(path): \(String(cString: strerror(errno)))\n")
        exit(1)
    }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
        if n == 0 { break }
        bytes += chunk[0..<n]
    }
    return bytes
}

var ran = 0
for path in arguments.dropFirst(2).flatMap(files(under:)) {
    let input = contents(of: path)
    input.withUnsafeBytes { target.run($0) }
    ran += 1
}
print("hv-fuzz \(target.name): \(ran) inputs ran without a finding")
#endif
