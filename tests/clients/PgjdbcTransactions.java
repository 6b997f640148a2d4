// Real-client suite, transactions (issue 15), Java: pgjdbc's setTransactionIsolation (it sends
// SET SESSION CHARACTERISTICS AS TRANSACTION …) and setReadOnly, checked inside the transaction,
// with prepareThreshold=1 (named server-side statements) and autocommit off (pgjdbc pipelines
// BEGIN in front of the first statement).
// Usage: java -cp /usr/share/java/postgresql.jar PgjdbcTransactions.java PORT TOKEN_1 TOKEN_2 [SESSION_MODE_PORT]
import java.sql.*;
import java.util.Properties;

public class PgjdbcTransactions {
    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    static String[] modes(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("select current_setting('transaction_isolation'), current_setting('transaction_read_only'), current_setting('app.tenant_id') where ? = 1")) {
            ps.setInt(1, 1);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return new String[] {rs.getString(1), rs.getString(2), rs.getString(3)};
            }
        }
    }

    public static void main(String[] args) {
        String result = "pass";
        Properties p = new Properties();
        p.setProperty("user", "alice");
        p.setProperty("password", args[1]);
        p.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection("jdbc:postgresql://127.0.0.1:" + args[0] + "/app", p)) {
            int[][] levels = {{Connection.TRANSACTION_SERIALIZABLE}, {Connection.TRANSACTION_REPEATABLE_READ}, {Connection.TRANSACTION_READ_COMMITTED}};
            String[] names = {"serializable", "repeatable read", "read committed"};
            for (int i = 0; i < levels.length; i++) {
                c.setAutoCommit(true);
                c.setTransactionIsolation(levels[i][0]);
                check(c.getTransactionIsolation() == levels[i][0], "getTransactionIsolation");
                c.setAutoCommit(false);
                for (int k = 0; k < 3; k++) {
                    String[] m = modes(c);
                    check(m[0].equals(names[i]) && m[2].equals("1"), "level " + names[i] + ": got " + m[0] + " tenant " + m[2]);
                    c.commit();
                }
            }
            c.setAutoCommit(true);
            c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
            c.setReadOnly(true);
            c.setAutoCommit(false);
            String[] m = modes(c);
            check(m[1].equals("on"), "setReadOnly: transaction_read_only " + m[1]);
            c.commit();
        } catch (Throwable t) {
            result = "FAIL " + t;
        }
        if (result.equals("pass") && args.length > 3) {
            // session mode: the driver's backend pid is the server's
            try (Connection c = DriverManager.getConnection("jdbc:postgresql://127.0.0.1:" + args[3] + "/app", p);
                 Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("select pg_backend_pid()")) {
                rs.next();
                int pid = c.unwrap(org.postgresql.PGConnection.class).getBackendPID();
                check(pid == rs.getInt(1), "session mode: getBackendPID " + pid + " vs pg_backend_pid() " + rs.getInt(1));
            } catch (Throwable t) {
                result = "FAIL " + t;
            }
        }
        System.out.println("client pgjdbc setTransactionIsolation/setReadOnly/getBackendPID: " + result);
        System.exit(result.equals("pass") ? 0 : 1);
    }
}
