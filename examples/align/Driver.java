// The align example as a Java program that launches each step the way Nextflow
// launches its task scripts: a ProcessBuilder running `bash -c SCRIPT`, with the
// task's output on the program's own stdout/stderr, independent tasks running
// concurrently, and the first failing task ending the run with its exit status.
//
//   javac -d /tmp/align-classes examples/align/Driver.java
//   java -cp /tmp/align-classes Driver OUTDIR [READS_1 READS_2]
//   arv-wrap -w whitelists/bcbio.yaml -- java -cp /tmp/align-classes Driver OUTDIR
//
// gen.py and summarize.sh are found in -Dalign.home=DIR, else next to the class
// file, else in ./examples/align. The same steps as run.sh.
import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;

public class Driver {
    static final class StepFailed extends Exception {
        final String step;
        final int status;

        StepFailed(String step, int status) {
            super(step);
            this.step = step;
            this.status = status;
        }
    }

    /** A task: a name and its bash script. */
    record Task(String name, String script) {}

    static String q(String s) {
        return "'" + s.replace("'", "'\\''") + "'";
    }

    /** Run tasks concurrently (a stage of independent tasks); fail with the first that failed. */
    static void stage(Task... tasks) throws IOException, InterruptedException, StepFailed {
        List<Process> running = new ArrayList<>();
        for (Task t : tasks) {
            ProcessBuilder pb = new ProcessBuilder("bash", "-c", "set -euo pipefail\n" + t.script());
            pb.inheritIO();
            running.add(pb.start());
        }
        StepFailed failed = null;
        for (int i = 0; i < tasks.length; i++) {
            int status = running.get(i).waitFor();
            if (status != 0 && failed == null) {
                failed = new StepFailed(tasks[i].name(), status);
            }
        }
        if (failed != null) {
            throw failed;
        }
    }

    static String home() {
        String prop = System.getProperty("align.home");
        if (prop != null) {
            return new File(prop).getAbsolutePath();
        }
        try {
            File dir = new File(Driver.class.getProtectionDomain().getCodeSource().getLocation().toURI());
            if (new File(dir, "gen.py").exists()) {
                return dir.getAbsolutePath();
            }
        } catch (Exception e) {
            // fall through
        }
        return new File("examples/align").getAbsolutePath();
    }

    static void pipeline(String out, String r1, String r2) throws Exception {
        String here = home();
        String data = out + "/data";
        String ref = data + "/ref.fa";
        String bam = out + "/sample.bam";
        String vcf = out + "/calls.vcf.gz";
        if (r1 == null) {
            r1 = data + "/reads_1.fq";
            r2 = data + "/reads_2.fq";
        }
        stage(new Task("generate", "mkdir -p " + q(out + "/logs") + "\npython3 " + q(here + "/gen.py") + " " + q(data)));
        stage(
            new Task("versions", "{ samtools --version; bcftools --version; } > " + q(out + "/versions.txt")),
            new Task("bwa index", "bwa index " + q(ref) + " 2> " + q(out + "/logs/bwa-index.log")),
            new Task("samtools faidx", "samtools faidx " + q(ref)));
        stage(new Task("align",
            "bwa mem -t 2 -R '@RG\\tID:sample\\tSM:sample' " + q(ref) + " " + q(r1) + " " + q(r2)
            + " \\\n    | samtools sort -@ 2 -o " + q(bam) + " -"));
        stage(new Task("index bam", "samtools index " + q(bam) + "\nsamtools quickcheck " + q(bam)));
        stage(new Task("call",
            "bcftools mpileup -Ou -f " + q(ref) + " " + q(bam)
            + " \\\n    | bcftools call -mv -Oz -o " + q(vcf)));
        stage(new Task("index calls", "bcftools index -t " + q(vcf)));
        stage(new Task("summary", q(here + "/summarize.sh") + " " + q(out)));
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1 && args.length != 3) {
            System.err.println("usage: java Driver OUTDIR [READS_1 READS_2]");
            System.exit(2);
        }
        try {
            pipeline(args[0], args.length == 3 ? args[1] : null, args.length == 3 ? args[2] : null);
        } catch (StepFailed e) {
            System.err.println("Driver: step '" + e.step + "' failed with exit status " + e.status);
            System.exit(e.status);
        }
    }
}
